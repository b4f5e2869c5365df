"""Passing a request from one stream on to another, and its response back:
how a worker serves a request another worker sent it. No HTTP here: heads,
bodies and RESETs go through as they came."""
from __future__ import annotations


from gateway.tunnel import frames
from gateway.tunnel.body import BodyReader, BodyWriter
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.exchange import InboundExchange, wait_head
from gateway.tunnel.stream import TunnelStream

__all__ = ["relay_exchange"]


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
        # The origin's RESET goes on with its reason (a timeout, a bad response), not as `cancelled`.
        cause = inbound.cause
        out.close(cause.code, cause.message) if cause is not None else out.close()
