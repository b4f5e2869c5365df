"""The client's local HTTP entry: egress requests go up the tunnel."""
from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.http.entry import EntryLog, body_problem, forward_headers, head_problem
from gateway.http.relay import relay_request
from gateway.http.target import BadTarget, normalise_target, with_host
from gateway.ids import RequestIds, new_instance_id, trace_id_from
from gateway.observe import AccessLog, RequestMetrics
from gateway.tunnel.errors import TunnelError

if TYPE_CHECKING:
    from gateway.client.agent import Agent

__all__ = ["LocalEntry"]


class LocalEntry:
    def __init__(self, agent: "Agent", *, access_log: AccessLog, metrics: RequestMetrics) -> None:
        self.agent = agent
        self.book = EntryLog(RequestIds(f"c{new_instance_id()}-"), worker="client", direction="egress",
                             access_log=access_log, metrics=metrics)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        cfg = self.agent.config
        book = self.book
        try:
            target = normalise_target(request.raw_path, request.host)
            bad_target = ""
        except BadTarget as exc:
            target, bad_target = None, str(exc)
        rec = book.record(trace_id=trace_id_from(request.headers), method=request.method,
                          host=target.host if target else request.host,
                          path=target.path_and_query if target else request.raw_path)
        with book.track(rec):
            rec.client_id = cfg.client_id
            rec.group = cfg.group
            refused = head_problem(request, cfg.max_header_bytes) or body_problem(request, cfg.max_body_bytes)
            if target is None:
                resp = book.fail(rec, "bad_target", bad_target, status=400)
            elif refused is not None:
                resp = book.fail(rec, *refused)
            elif (stream := self.agent.pick_stream()) is None:
                resp = book.fail(rec, "tunnel_unavailable", "the tunnel to the gateway is not connected",
                                 status=503, retry_after=1)
            else:
                try:
                    resp = await relay_request(
                        request, stream, request_id=rec.request_id, trace_id=rec.trace_id,
                        headers=with_host(forward_headers(request, cfg.trusted_proxies), target.host),
                        path=target.path_and_query, authority=target.host,
                        timeout=cfg.request_timeout, max_body=cfg.max_body_bytes,
                        idle_timeout=cfg.stream_idle_timeout, record=rec,
                    )
                except TunnelError as exc:
                    resp = book.fail_with(rec, exc)
            rec.status = resp.status
            return resp
