"""The entry side of HTTP over a tunnel stream, used by both programs: an
aiohttp request goes down a stream and the response streams back (the
gateway's public entry for ingress, the client's local entry for egress).
The serving side is `gateway.http.upstream`."""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from multidict import CIMultiDict

from gateway.http.headers import has_body_response
from gateway.http.response_head import check_response_head
from gateway.http.websocket import MAX_MESSAGE, bridge_entry, is_websocket
from gateway.inspection import Capture
from gateway.observe import AccessRecord
from gateway.tunnel import frames
from gateway.tunnel.errors import TunnelError, error_body
from gateway.tunnel.exchange import OutboundExchange, wait_head
from gateway.tunnel.stream import TunnelStream

__all__ = ["error_response", "relay_request", "expectation", "send_continue"]

log = logging.getLogger("gateway.proxy")


def error_response(
    code: str,
    message: str,
    *,
    request_id: str,
    trace_id: str,
    client_id: str = "",
    status: int | None = None,
    retry_after: int | None = None,
) -> web.Response:
    headers = {"x-request-id": request_id, "x-trace-id": trace_id}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return web.Response(
        status=status or TunnelError(code).status,
        body=error_body(code, message, request_id=request_id, trace_id=trace_id, client_id=client_id),
        content_type="application/json",
        headers=headers,
    )


class BodyTooLarge(Exception):
    pass


async def _send_kept(ex: OutboundExchange, body: bytes, chunk_size: int) -> None:
    """Send a body read whole beforehand (kept so that the request can be retried)."""
    for at in range(0, len(body), chunk_size):
        await ex.sender.write(body[at:at + chunk_size])
    ex.sender.end()


async def _pump_body(request: web.Request, ex: OutboundExchange, max_body: int, chunk_size: int,
                     capture: Capture | None = None) -> None:
    total = 0
    # Each piece as it was read from the socket: iter_chunked(n) would join pieces into n bytes
    # (a copy); the writer cuts a piece over `chunk_size` into frames of views.
    async for chunk, _end_of_http_chunk in request.content.iter_chunks():
        if not chunk:
            continue
        total += len(chunk)
        if total > max_body:
            raise BodyTooLarge()
        if capture is not None:
            capture.request_chunk(chunk)
        await ex.sender.write(chunk)
    ex.sender.end()
    if capture is not None:
        capture.request_end()


async def relay_request(
    request: web.Request,
    stream: TunnelStream,
    *,
    request_id: str,
    trace_id: str,
    headers: list[tuple[str, str]],
    path: str,
    authority: str,
    timeout: float,
    max_body: int,
    group: str = "",
    target_client: str = "",
    idle_timeout: float | None = None,
    record: AccessRecord | None = None,
    body: bytes | None = None,
    wire_id: str = "",
    capture: Capture | None = None,
) -> web.StreamResponse:
    """Send `request` down `stream` and stream the response back to the caller.
    `record`, when given, gets the status, the body sizes and any error.
    `body`: the request's body, read whole already (a request that may be
    retried), sent instead of the caller's. `wire_id`: the id on the tunnel
    when it is not `request_id` (a retry's). `capture`: the inspector's (gateway/inspection.py),
    given the body chunks as they pass and a streamed response's head."""
    websocket = is_websocket(request.method, request.headers)
    # A WebSocket's messages travel as its body, so its body stays open.
    has_body = request.body_exists or websocket
    ex = stream.open_request(
        wire_id or request_id,
        trace_id,
        method=request.method,
        path=path,
        scheme=("wss" if request.secure else "ws") if websocket else request.scheme,
        authority=authority,
        headers=headers,
        end_stream=not has_body,
        timeout_ms=int(timeout * 1000),
        group=group,
        target_client=target_client,
        idle_timeout_ms=int(idle_timeout * 1000) if idle_timeout else 0,
    )
    loop = stream.loop
    pump: asyncio.Task[None] | None = None
    try:
        if has_body and not websocket:
            if body is None:
                await send_continue(request)
                pump = loop.create_task(_pump_body(request, ex, max_body, stream.limits.chunk_size, capture))
            else:
                pump = loop.create_task(_send_kept(ex, body, stream.limits.chunk_size))
            await wait_head(ex.head, pump, ex.sender, timeout)
            if not ex.head.done() and pump.done():
                exc = pump.exception()
                if isinstance(exc, BodyTooLarge):
                    ex.close("body_too_large", "request body over the limit")
                    raise TunnelError("body_too_large", f"request body is over {max_body} bytes")
                if exc is not None and not isinstance(exc, TunnelError):
                    # The caller's upload broke; nothing to answer.
                    ex.close("cancelled", "caller's request body failed")
                    raise TunnelError("bad_request", f"request body failed: {exc}")
        else:
            # A timer, not asyncio.wait: this is every bodiless request's path.
            timer = loop.call_later(timeout, _expire, ex, timeout)
            try:
                await ex.head
            except TunnelError:
                pass
            finally:
                timer.cancel()
        if not ex.head.done():
            _expire(ex, timeout)
        head = ex.head.result()  # raises the TunnelError of a RESET, a lost stream or the timeout
        # Across workers `stream` is a channel: the client is the one the request was sent to.
        client = target_client or stream.peer_id
        try:
            checked = check_response_head(head.status, head.reason, frames.header_list(head), upgrade=websocket)
        except TunnelError as exc:
            _untrusted(client, group, request_id, trace_id, exc.message)
            ex.close("bad_response", exc.message)
            raise
        if checked.status == 101:  # only when the caller asked for a WebSocket (checked)
            ex.websocket = True
            if record is not None:
                record.status = 101
            return await bridge_entry(request, ex, checked.headers, MAX_MESSAGE)
        if record is not None:
            record.status = checked.status
        with_body = has_body_response(request.method, checked.status)
        # The gateway frames the body: the declared length when there is one
        # (aiohttp sends no byte past it), else chunked; a body that does not
        # match it cuts the caller's connection, so nothing reads on from it.
        length = checked.length if with_body else None
        whole = ex.body.take_complete() if with_body else None
        if whole is not None:
            # The whole body came with the head (a small response): one
            # Response, so head and body leave in one write.
            wrong = length is not None and len(whole) != length
            if wrong:
                _untrusted(client, group, request_id, trace_id,
                           f"a body of {len(whole)} bytes with Content-Length {length}")
                whole = whole[:length]
                if record is not None:
                    record.error = "bad_response"
            if record is not None:
                record.bytes_out = len(whole)
            resp = web.Response(status=checked.status, reason=checked.reason or None, body=whole,
                                headers=checked.headers)
            _stamp_ids(resp.headers, request_id, trace_id)
            if wrong:
                resp.force_close()
            return resp
        resp = web.StreamResponse(status=checked.status, reason=checked.reason or None, headers=checked.headers)
        _stamp_ids(resp.headers, request_id, trace_id)
        await resp.prepare(request)
        if capture is not None:
            capture.response_headers = resp.headers
        sent = 0
        if with_body:
            try:
                while (chunk := await ex.body.read(idle_timeout)) is not None:
                    if length is not None and sent + len(chunk) > length:
                        await resp.write(chunk[:length - sent])
                        sent = length
                        raise _overrun(client, group, request_id, trace_id, f"more body than Content-Length {length}")
                    sent += len(chunk)
                    if capture is not None:
                        capture.response_chunk(chunk)
                    await resp.write(chunk)
                if length is not None and sent < length:
                    raise _overrun(client, group, request_id, trace_id,
                                   f"a body of {sent} bytes with Content-Length {length}")
            except TunnelError as exc:
                # The head is out; the only honest signal left is a cut connection.
                log.warning("response body cut: %s", exc.code, extra={"request_id": request_id, "trace_id": trace_id})
                if record is not None:
                    record.error = exc.code
                ex.close(exc.code, exc.message)
                resp.force_close()
                if request.transport is not None:
                    request.transport.close()
                return resp
            finally:
                if record is not None:
                    record.bytes_out = sent
        await resp.write_eof()
        return resp
    finally:
        if pump is not None and not pump.done():
            pump.cancel()
        if record is not None:
            record.bytes_in = ex.sender.bytes_sent
        ex.close()


def expectation(request: web.BaseRequest) -> str | None:
    """The request's Expect, lower-cased; None when absent or HTTP/1.0 (RFC 9110 10.1.1: ignored there)."""
    expect = request.headers.get("Expect")
    return expect.lower() if expect is not None and request.version >= (1, 1) else None


async def send_continue(request: web.BaseRequest) -> None:
    """Answer `Expect: 100-continue` now that the request is accepted and its body is wanted."""
    if expectation(request) == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not started


def _expire(ex: OutboundExchange, timeout: float) -> None:
    if not ex.head.done():
        ex.close("timeout", f"no response head within {timeout:g}s")


def _untrusted(client: str, group: str, request_id: str, trace_id: str, problem: str) -> None:
    """The log line of a response a tunnel client got wrong, naming the client."""
    log.warning("bad response from tunnel client %s (group %s): %s", client, group or "-", problem,
                extra={"request_id": request_id, "trace_id": trace_id, "client_id": client,
                       "code": "bad_response"})


def _overrun(client: str, group: str, request_id: str, trace_id: str, problem: str) -> TunnelError:
    _untrusted(client, group, request_id, trace_id, problem)
    return TunnelError("bad_response", problem)


def _stamp_ids(headers: CIMultiDict[str], request_id: str, trace_id: str) -> None:
    # On the response's own headers: a copy made only to add two would be a second one.
    headers["x-request-id"] = request_id
    headers["x-trace-id"] = trace_id
