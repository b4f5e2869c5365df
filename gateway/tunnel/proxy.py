"""HTTP over a tunnel stream, both halves, used by both programs.

`relay_request` is the entry side: an aiohttp request goes down a stream and
the response streams back (the gateway's public entry for ingress, the
client's local entry for egress). `call_upstream` is the serving side: a
request that arrived on a stream is made to an upstream through a pooled
aiohttp session (the client for ingress, the gateway for egress).
"""
from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.httpmap import end_to_end, has_body_response
from gateway.observe import AccessRecord
from gateway.tunnel import frames
from gateway.tunnel.errors import TunnelError, error_body
from gateway.tunnel.websocket import MAX_MESSAGE, bridge_entry, bridge_upstream, is_websocket
from gateway.tunnel.upstream_http import HttpPool, UpstreamError, UpstreamTimeout
from gateway.tunnel.stream import BodyReader, BodyWriter, InboundExchange, OutboundExchange, TunnelStream

__all__ = ["error_response", "relay_request", "relay_exchange", "call_upstream", "upstream_session", "UpstreamClients"]

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


async def _pump_body(request: web.Request, ex: OutboundExchange, max_body: int, chunk_size: int) -> None:
    total = 0
    async for chunk in request.content.iter_chunked(chunk_size):
        total += len(chunk)
        if total > max_body:
            raise BodyTooLarge()
        await ex.sender.write(chunk)
    ex.sender.end()


async def wait_head(head: asyncio.Future, pump: asyncio.Task[None] | None, sender: BodyWriter,
                    timeout: float | None) -> None:
    """Wait for a response head while the request body goes up. The head's
    `timeout` counts from the end of the upload, so a big upload is not taken
    for a slow upstream; while it lasts, a whole `timeout` without one byte of
    progress ends the wait. Returns early when the upload fails."""
    sent = -1
    while pump is not None and not pump.done() and not head.done():
        if sender.bytes_sent == sent:
            return  # the upload stalled for a whole timeout
        sent = sender.bytes_sent
        await asyncio.wait([head, pump], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if head.done():
        return
    if pump is not None and (not pump.done() or pump.cancelled() or pump.exception() is not None):
        return  # stalled, or the upload failed: the caller decides
    await asyncio.wait([head], timeout=timeout)


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
) -> web.StreamResponse:
    """Send `request` down `stream` and stream the response back to the caller.
    `record`, when given, gets the status, the body sizes and any error."""
    websocket = is_websocket(request.method, request.headers)
    # A WebSocket's messages travel as its body, so its body stays open.
    has_body = request.body_exists or websocket
    ex = stream.open_request(
        request_id,
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
            await send_continue(request)
            pump = loop.create_task(
                _pump_body(request, ex, max_body, stream.limits.chunk_size)
            )
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
        if websocket and head.status == 101:
            ex.websocket = True
            if record is not None:
                record.status = 101
            return await bridge_entry(request, ex, head, MAX_MESSAGE)
        if record is not None:
            record.status = head.status
        with_body = has_body_response(request.method, head.status)
        whole = ex.body.take_complete() if with_body else None
        if whole is not None:
            # The whole body came with the head (a small response): one
            # Response, so head and body leave in one write.
            if record is not None:
                record.bytes_out = len(whole)
            resp = web.Response(status=head.status, reason=head.reason or None, body=whole,
                                headers=frames.header_list(head))
            _stamp_ids(resp.headers, request_id, trace_id)
            return resp
        resp = web.StreamResponse(status=head.status, reason=head.reason or None, headers=frames.header_list(head))
        _stamp_ids(resp.headers, request_id, trace_id)
        content_length = resp.headers.get("Content-Length")
        if content_length is not None and content_length.isdigit():
            resp.content_length = int(content_length)
        await resp.prepare(request)
        sent = 0
        if with_body:
            try:
                while (chunk := await ex.body.read(idle_timeout)) is not None:
                    sent += len(chunk)
                    await resp.write(chunk)
            except TunnelError as exc:
                # The head is out; the only honest signal left is a cut connection.
                log.warning("response body cut: %s", exc.code, extra={"request_id": request_id, "trace_id": trace_id})
                if record is not None:
                    record.error = exc.code
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


def _stamp_ids(headers: CIMultiDict[str], request_id: str, trace_id: str) -> None:
    # On the response's own headers: a copy made only to add two would be a second one.
    headers["x-request-id"] = request_id
    headers["x-trace-id"] = trace_id


def upstream_session(*, connect_timeout: float = 5.0, limit: int = 0) -> aiohttp.ClientSession:
    """One pooled session that changes nothing it carries (WebSockets, health checks)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ttl_dns_cache=60, enable_cleanup_closed=True),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class UpstreamClients:
    """What the serving side calls upstreams with: the lean pool for HTTP
    requests, aiohttp for WebSocket upgrades and health checks."""

    def __init__(self, *, connect_timeout: float = 5.0) -> None:
        self.session = upstream_session(connect_timeout=connect_timeout)
        self.http = HttpPool(connect_timeout=connect_timeout)

    async def close(self) -> None:
        await self.http.close()
        await self.session.close()


async def call_upstream(
    ex: InboundExchange,
    clients: UpstreamClients,
    server: str,
    *,
    headers: list[tuple[str, str]],
    path: str,
    timeout: float,
    idle_timeout: float = 0.0,
    head_timeout: float | None = None,
) -> bool:
    """Make the exchange's request to `server` and stream the response back.
    `head_timeout` bounds the wait for the response head here (a rule of this
    end stricter than what the originator enforces); past it, a `timeout` RESET.
    False when the upstream failed (refused, broke, timed out): passive health."""
    if ex.head.scheme in ("ws", "wss"):
        scheme = "wss" if server.startswith("https:") else "ws"
        url = scheme + server[server.index(":"):] + path
        return await bridge_upstream(ex, clients.session, url, headers, timeout, MAX_MESSAGE)
    method = ex.head.method
    body = None if ex.body.at_eof else ex.body.iter_chunks()
    # The originator enforces its head timeout (its RESET cancels this call);
    # here only silence is bounded, so long streams may go on.
    try:
        try:
            resp = await clients.http.request(server, method, path, headers, body,
                                              read_timeout=max(timeout, idle_timeout), head_timeout=head_timeout)
        except UpstreamTimeout as exc:
            log.warning("upstream %s: %s", server, exc, extra={"request_id": ex.request_id, "trace_id": ex.trace_id})
            ex.reset("timeout", str(exc))
            return False
        try:
            with_body = has_body_response(method, resp.status)
            ex.respond(resp.status, resp.reason, end_to_end(resp.raw_headers), end_stream=not with_body)
            if with_body:
                while (chunk := await resp.read()) is not None:
                    # The last chunk carries the end of the body: one frame fewer.
                    await ex.sender.write(chunk, end=resp.at_end)
                ex.sender.end()
        finally:
            resp.release()
        return True
    except (UpstreamError, ValueError) as exc:
        log.warning(
            "upstream %s failed: %s", server, exc or type(exc).__name__,
            extra={"request_id": ex.request_id, "trace_id": ex.trace_id},
        )
        ex.reset("upstream_unavailable", f"{server}: {exc}")
        return False


async def _copy_body(src: BodyReader, dst: BodyWriter) -> None:
    while (chunk := await src.read()) is not None:
        await dst.write(chunk)
    dst.end()


async def relay_exchange(inbound: InboundExchange, stream: TunnelStream) -> None:
    """Pass a request that arrived on one stream on to another, and its
    response back: how a worker serves a request another worker sent it."""
    head = inbound.head
    out = stream.open_request(
        inbound.request_id,
        inbound.trace_id,
        method=head.method,
        path=head.path,
        scheme=head.scheme,
        authority=head.authority,
        headers=frames.header_list(head),
        end_stream=head.end_stream,
        timeout_ms=head.timeout_ms,
        idle_timeout_ms=head.idle_timeout_ms,
    )
    pump = None if head.end_stream else stream.loop.create_task(_copy_body(inbound.body, out.sender))
    try:
        # The origin enforces the timeout (its RESET cancels this task); this
        # bound only keeps an orphan from waiting forever.
        limit = head.timeout_ms / 1000 + 5 if head.timeout_ms else None
        await wait_head(out.head, pump, out.sender, limit)
        if not out.head.done():
            raise TunnelError("timeout", "no response head")
        rhead = out.head.result()
        inbound.respond(rhead.status, rhead.reason, frames.header_list(rhead),
                        end_stream=rhead.end_stream)
        if not rhead.end_stream:
            await _copy_body(out.body, inbound.sender)
    except TunnelError as exc:
        inbound.reset(exc.code, exc.message)
    finally:
        if pump is not None and not pump.done():
            pump.cancel()
        out.close()
