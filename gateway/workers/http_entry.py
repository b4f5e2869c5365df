"""The public HTTP entry: match a route, pick a client stream, relay."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.httpmap import apply_rule, decode_raw, end_to_end, forwarded, header_bytes
from gateway.ids import trace_id_from
from gateway.rules import first_match
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.proxy import error_response, relay_request

if TYPE_CHECKING:
    from gateway.workers.worker import Worker

__all__ = ["HttpEntry"]

log = logging.getLogger("gateway.access")


class HttpEntry:
    def __init__(self, worker: "Worker") -> None:
        self.worker = worker
        self.requests = 0
        self.active = 0
        self.errors: dict[str, int] = {}

    def _error(self, code: str, message: str, rid: str, trace: str, client_id: str = "", **kw) -> web.Response:
        self.errors[code] = self.errors.get(code, 0) + 1
        log.info("request failed: %s", code, extra={"request_id": rid, "trace_id": trace, "code": code,
                                                    "client_id": client_id, "detail": message})
        return error_response(code, message, request_id=rid, trace_id=trace, client_id=client_id, **kw)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        try:
            return await self._handle(request)
        finally:
            self.active -= 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        worker = self.worker
        cfg = worker.config
        self.requests += 1
        rid = worker.ids.next()
        trace = trace_id_from(request.headers)
        raw_path = request.raw_path
        if header_bytes(request.raw_headers) + len(raw_path) > cfg.max_header_bytes:
            return self._error("headers_too_large", f"request head over {cfg.max_header_bytes} bytes", rid, trace)
        path_only = raw_path.split("?", 1)[0]
        rule = first_match(cfg.routes, request.host, path_only, request.method, request.headers)
        if rule is None:
            return self._error("no_matching_rule", f"no route matches {request.method} {request.host}{path_only}", rid, trace)
        length = request.content_length
        if length is not None and length > cfg.max_body_bytes:
            return self._error("body_too_large", f"request body is over {cfg.max_body_bytes} bytes", rid, trace)
        group = cfg.groups[rule.target]
        # Prefer a stream this worker owns; else a worker that has one, through the router.
        stream = worker.registry.pick(group.name, group.balance)
        if stream is None and worker.link is not None:
            stream = worker.link.route(group.name)
        if stream is None:
            return self._error("no_client_available", f"no client of group {group.name!r} is connected", rid, trace,
                               retry_after=1)
        headers = forwarded(
            end_to_end(decode_raw(request.raw_headers)),
            remote=request.remote or "",
            proto=request.scheme,
            host=request.host,
        )
        headers = apply_rule(headers, rule)
        try:
            return await relay_request(
                request,
                stream,
                request_id=rid,
                trace_id=trace,
                headers=headers,
                path=rule.rewrite_path(raw_path),
                authority=rule.set_host or request.host,
                timeout=rule.timeout,
                max_body=cfg.max_body_bytes,
                group=group.name,
            )
        except TunnelError as exc:
            retry = 1 if exc.status == 503 else None
            return self._error(exc.code, exc.message, rid, trace, stream.peer_id, retry_after=retry)
