"""The client's local HTTP entry: egress requests go up the tunnel."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.httpmap import decode_raw, end_to_end, forwarded, header_bytes
from gateway.ids import RequestIds, new_instance_id, trace_id_from
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.proxy import error_response, relay_request

if TYPE_CHECKING:
    from gateway.client.agent import Agent

__all__ = ["LocalEntry"]

log = logging.getLogger("gateway.client.access")


class LocalEntry:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.ids = RequestIds(f"c{new_instance_id()}-")
        self.requests = 0

    def _error(self, code: str, message: str, rid: str, trace: str, **kw) -> web.Response:
        log.info("egress request failed: %s", code, extra={"request_id": rid, "trace_id": trace, "code": code,
                                                           "detail": message})
        return error_response(code, message, request_id=rid, trace_id=trace, client_id=self.agent.config.client_id, **kw)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        cfg = self.agent.config
        self.requests += 1
        rid = self.ids.next()
        trace = trace_id_from(request.headers)
        if header_bytes(request.raw_headers) + len(request.raw_path) > cfg.max_header_bytes:
            return self._error("headers_too_large", f"request head over {cfg.max_header_bytes} bytes", rid, trace)
        length = request.content_length
        if length is not None and length > cfg.max_body_bytes:
            return self._error("body_too_large", f"request body is over {cfg.max_body_bytes} bytes", rid, trace)
        stream = self.agent.pick_stream()
        if stream is None:
            return self._error("tunnel_unavailable", "the tunnel to the gateway is not connected", rid, trace,
                               status=503, retry_after=1)
        headers = forwarded(
            end_to_end(decode_raw(request.raw_headers)), remote=request.remote or "", proto=request.scheme,
            host=request.host,
        )
        try:
            return await relay_request(
                request, stream, request_id=rid, trace_id=trace, headers=headers, path=request.raw_path,
                authority=request.host, timeout=cfg.request_timeout, max_body=cfg.max_body_bytes,
            )
        except TunnelError as exc:
            return self._error(exc.code, exc.message, rid, trace, retry_after=1 if exc.status == 503 else None)
