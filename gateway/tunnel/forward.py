"""Passing a request from one stream on to another, and its response back:
how a worker serves a request another worker sent it. No HTTP here: heads,
bodies and RESETs go through as they came.

Every request a worker serves for another (of this node or another) pays this
path on top of the client's stream, so it is kept lean: heads are copied over
as protobuf messages (no list of pairs in between), a body's last chunk carries
the end flag (no empty DATA frame after it), and a request without a body
waits for its response head on a timer, not on asyncio.wait.
"""
from __future__ import annotations


from gateway.tunnel import frames
from gateway.tunnel.body import BodyReader, BodyWriter
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.exchange import InboundExchange, OutboundExchange, wait_head
from gateway.tunnel.stream import TunnelStream

__all__ = ["relay_exchange"]

# Request head fields for the origin's routing only: not passed on to the client.
_ROUTING_FIELDS = ("group", "target_client")


async def _copy_body(src: BodyReader, dst: BodyWriter) -> None:
    while (chunk := await src.read()) is not None:
        # The last chunk carries the end flag: one DATA frame less.
        await dst.write(chunk, end=src.at_eof)
    dst.end()


def _request_head(head: frames.pb.Headers, fields: bool) -> frames.pb.Headers | None:
    """The head to send the client: the origin's, less its routing fields; None when
    its header list is in a form the client does not read (then it is rebuilt)."""
    if head.header_fields and not fields:
        return None
    out = frames.pb.Headers()
    out.CopyFrom(head)
    for name in _ROUTING_FIELDS:
        out.ClearField(name)
    return out


def _response_head(rhead: frames.pb.Headers, fields: bool) -> frames.pb.Headers | None:
    """The response head to send the origin: status, reason, end and the header list
    as they came (the origin checks them); None when the origin does not read their form."""
    if rhead.header_fields:
        if not fields:
            return None
        return frames.pb.Headers(status=rhead.status, reason=rhead.reason, end_stream=rhead.end_stream,
                                 header_fields=rhead.header_fields)
    return frames.pb.Headers(status=rhead.status, reason=rhead.reason, end_stream=rhead.end_stream,
                             headers=rhead.headers)


def _open(inbound: InboundExchange, stream: TunnelStream) -> OutboundExchange:
    head = inbound.head
    copied = _request_head(head, stream.header_fields)
    if copied is not None:
        return stream.open_request(inbound.request_id, inbound.trace_id, end_stream=head.end_stream, head=copied)
    return stream.open_request(
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


def _expire(out: OutboundExchange) -> None:
    if not out.head.done():
        out.head.set_exception(TunnelError("timeout", "no response head"))
        out.head.exception()  # retrieved: the caller reads it by done()


async def relay_exchange(inbound: InboundExchange, stream: TunnelStream) -> None:
    """Pass a request that arrived on one stream on to another, and its
    response back: how a worker serves a request another worker sent it."""
    head = inbound.head
    out = _open(inbound, stream)
    pump = None if head.end_stream else stream.loop.create_task(_copy_body(inbound.body, out.sender))
    try:
        # The origin enforces the timeout (its RESET cancels this task); this
        # bound only keeps an orphan from waiting forever.
        limit = head.timeout_ms / 1000 + 5 if head.timeout_ms else None
        if pump is not None:
            await wait_head(out.head, pump, out.sender, limit)
        else:
            # A timer, not asyncio.wait: this is every bodiless request's path.
            timer = stream.loop.call_later(limit, _expire, out) if limit is not None else None
            try:
                await out.head
            except TunnelError:
                pass
            finally:
                if timer is not None:
                    timer.cancel()
        if not out.head.done():
            raise TunnelError("timeout", "no response head")
        rhead = out.head.result()  # raises the TunnelError of a RESET or a lost stream
        copied = _response_head(rhead, inbound.stream.header_fields)
        if copied is not None:
            inbound.respond_head(copied)
        else:
            inbound.respond(rhead.status, rhead.reason, frames.header_list(rhead), end_stream=rhead.end_stream)
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
