"""What every HTTP entry does around relaying a request: ids, limits, errors,
the access record. The gateway's public entry and the client's local entry
differ only in how they choose a stream (`serve`)."""
from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from gateway.httpmap import end_to_end, forwarded, header_bytes
from gateway.ids import RequestIds, trace_id_from
from gateway.observe import NO_METRICS, AccessLog, AccessRecord, RateWindow, RequestMetrics
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.proxy import error_response, expectation, relay_request
from gateway.tunnel.stream import TunnelStream

__all__ = ["HttpEntryBase", "entry_runner"]

log = logging.getLogger("gateway.access")

_ANSWERED_HERE = frozenset({b"expect"})


def entry_runner(handler, max_header_bytes: int) -> web.BaseRunner:
    """The runner of an entry: aiohttp's low-level server calling `handler` for
    every request (no application, router or middlewares: every path is ours)."""
    # aiohttp's own limits sit above ours so oversize heads reach the
    # handler and get our 431 with a JSON body.
    limit = max(8190, max_header_bytes * 2)
    server = web.Server(handler, handler_cancellation=True, access_log=None, max_line_size=limit, max_field_size=limit)
    return web.ServerRunner(server, handle_signals=False)


class HttpEntryBase:
    direction = "ingress"

    def __init__(self, ids: RequestIds, *, worker: str, access_log: AccessLog | None = None,
                 metrics: RequestMetrics = NO_METRICS) -> None:
        self.ids = ids
        self.worker = worker
        self.access_log = access_log or AccessLog("off")
        self.metrics = metrics
        self.requests = 0
        self.active = 0
        self.errors: dict[str, int] = {}
        self.window = RateWindow()

    async def serve(self, request: web.Request, rec: AccessRecord) -> web.StreamResponse:
        raise NotImplementedError

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rec = AccessRecord(
            request_id=self.ids.next(), trace_id=trace_id_from(request.headers), method=request.method,
            host=request.host, path=request.raw_path, worker=self.worker, direction=self.direction,
        )
        self.requests += 1
        self.active += 1
        t0 = time.monotonic()
        try:
            resp = await self.serve(request, rec)
            rec.status = resp.status
            return resp
        except asyncio.CancelledError:
            # The caller went away; the exchange's RESET already went down the stream.
            rec.error = rec.error or "client_disconnected"
            rec.status = rec.status or 499
            raise
        finally:
            self.active -= 1
            rec.duration = time.monotonic() - t0
            self.access_log.write(rec)
            self.metrics.observe(rec)
            self.window.add(bool(rec.error) or rec.status >= 500)

    def fail(self, rec: AccessRecord, code: str, message: str, *, status: int | None = None,
             retry_after: int | None = None) -> web.Response:
        self.errors[code] = self.errors.get(code, 0) + 1
        rec.error = code
        log.info("request failed: %s", code, extra={"request_id": rec.request_id, "trace_id": rec.trace_id,
                                                    "code": code, "client_id": rec.client_id, "detail": message})
        return error_response(code, message, request_id=rec.request_id, trace_id=rec.trace_id,
                              client_id=rec.client_id, status=status, retry_after=retry_after)

    def check_head(self, request: web.Request, rec: AccessRecord, max_header: int) -> web.Response | None:
        if header_bytes(request.raw_headers) + len(request.raw_path) > max_header:
            return self.fail(rec, "headers_too_large", f"request head over {max_header} bytes")
        expect = expectation(request)
        if expect is not None and expect != "100-continue":  # the only expectation HTTP defines
            return self.fail(rec, "expectation_failed", f"unknown Expect: {request.headers['Expect']}")
        return None

    def check_body(self, request: web.Request, rec: AccessRecord, max_body: int) -> web.Response | None:
        """A declared length over the limit; a chunked body is counted as it streams."""
        length = request.content_length
        if length is not None and length > max_body:
            return self.fail(rec, "body_too_large", f"request body is over {max_body} bytes")
        return None

    @staticmethod
    def forward_headers(request: web.Request) -> list[tuple[str, str]]:
        # The entry answers Expect itself (100 Continue, or 417 in check_head), so it goes no further.
        return forwarded(end_to_end(request.raw_headers, _ANSWERED_HERE),
                         remote=request.remote or "", proto=request.scheme, host=request.host)

    async def relay(self, request: web.Request, rec: AccessRecord, stream: TunnelStream, *,
                    headers: list[tuple[str, str]], path: str, authority: str, timeout: float, max_body: int,
                    group: str = "", target_client: str = "", idle_timeout: float | None = None) -> web.StreamResponse:
        rec.client_id = rec.client_id or stream.peer_id
        try:
            return await relay_request(
                request, stream, request_id=rec.request_id, trace_id=rec.trace_id, headers=headers, path=path,
                authority=authority, timeout=timeout, max_body=max_body, group=group,
                target_client=target_client, idle_timeout=idle_timeout, record=rec,
            )
        except TunnelError as exc:
            return self.fail(rec, exc.code, exc.message, retry_after=1 if exc.status == 503 else None)
