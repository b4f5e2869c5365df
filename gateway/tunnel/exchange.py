"""One request on a tunnel stream, from either end: the exchange this end
originated (send the body, await the response) and the one the peer
originated (read the body, send the response)."""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Iterable, Protocol

from gateway.tunnel import frames
from gateway.tunnel.body import BodyReader, BodyWriter
from gateway.tunnel.errors import TunnelError

if TYPE_CHECKING:
    from gateway.tunnel.stream import TunnelStream

__all__ = ["OutboundExchange", "InboundExchange", "ExchangeWatch", "wait_head"]


class ExchangeWatch(Protocol):
    """What an inbound exchange tells of its answer as it goes (the client's Inspector:
    gateway/client/inspector.py); its bodies' chunks go to their readers' and writers' `tap`."""

    def response_head(self, head: frames.pb.Headers) -> None: ...

    def reset(self, code: str) -> None: ...


class OutboundExchange:
    """A request this end originated: send its body, await the response."""

    __slots__ = ("stream", "request_id", "trace_id", "head", "body", "sender", "_closed", "started", "websocket")

    def __init__(self, stream: "TunnelStream", request_id: str, trace_id: str) -> None:
        # A WebSocket whose close went out ends without a RESET: the far side closes in turn.
        self.websocket = False
        self.stream = stream
        self.request_id = request_id
        self.trace_id = trace_id
        self.head: asyncio.Future[frames.pb.Headers] = stream.loop.create_future()
        self.body = BodyReader(stream, request_id, trace_id, False, stream.limits.window)
        self.sender = BodyWriter(stream, request_id, trace_id, False, stream.limits.window)
        self._closed = False
        self.started = time.monotonic()

    @property
    def client_id(self) -> str:
        return self.stream.peer_id

    def on_frame(self, f: frames.Frame | frames.DataFrame, kind: str) -> None:
        if kind == "data":
            if not self.head.done():
                self._protocol_violation("DATA before response HEADERS")
            elif not self.body.feed(f.data, f.end_stream):
                self._protocol_violation("flow control window exceeded")
        elif kind == "window":
            self.sender.grant(f.window.increment)
        elif kind == "headers":
            if self.head.done():
                self._protocol_violation("second response HEADERS")
                return
            if f.headers.status == 103 and not f.headers.end_stream:
                return  # Early Hints: an interim head, dropped; the final one follows
            self.head.set_result(f.headers)
            if f.headers.end_stream:
                self.body.feed(b"", True)
        elif kind == "reset":
            self.fail(TunnelError(f.reset.code or "reset", f.reset.message))
            self._forget()

    def _protocol_violation(self, message: str) -> None:
        """The peer broke the protocol on this request: it is reset with that reason (not `cancelled`)."""
        self.stream.faults.report(self.stream, message, self.request_id, self.trace_id)
        self.fail(TunnelError("protocol_error", message))
        if not self._closed:
            self.stream.push(frames.reset(self.request_id, self.trace_id, "protocol_error", message, reply=False))
        self._forget()

    def fail(self, error: TunnelError) -> None:
        if not self.head.done():
            self.head.set_exception(error)
            # Nobody may await the head after a failure; mark it retrieved.
            self.head.exception()
        self.body.fail(error)
        self.sender.fail(error)

    def _forget(self) -> None:
        if not self._closed:
            self._closed = True
            self.stream.pending.pop(self.request_id, None)

    def close(self, code: str = "cancelled", message: str = "") -> None:
        """Done with this request; tell the peer to stop if it is unfinished."""
        if self._closed:
            return
        if not self.body.at_eof and not (self.websocket and self.sender.ended):
            self.stream.push(frames.reset(self.request_id, self.trace_id, code, message, reply=False))
            self.fail(TunnelError(code, message))
        self._forget()


class InboundExchange:
    """A request the peer originated: read its body, send a response."""

    __slots__ = ("stream", "request_id", "trace_id", "head", "body", "sender", "task", "responded", "_closed", "started",
                 "cause", "status", "watch")

    def __init__(self, stream: "TunnelStream", request_id: str, trace_id: str, head: frames.pb.Headers) -> None:
        self.stream = stream
        self.request_id = request_id
        self.trace_id = trace_id
        self.head = head
        self.body = BodyReader(stream, request_id, trace_id, True, stream.limits.window)
        self.sender = BodyWriter(stream, request_id, trace_id, True, stream.limits.window)
        self.task: asyncio.Task[None] | None = None
        self.responded = False
        self._closed = False
        self.started = time.monotonic()
        self.cause: TunnelError | None = None  # the peer's RESET, passed on by whoever relays this request
        self.status = 0  # of the response head sent (0: none, e.g. a RESET)
        self.watch: ExchangeWatch | None = None

    def on_frame(self, f: frames.Frame | frames.DataFrame, kind: str) -> None:
        if kind == "data":
            if not self.body.feed(f.data, f.end_stream):
                self.stream.faults.report(self.stream, "flow control window exceeded", self.request_id, self.trace_id)
                self.reset("protocol_error", "flow control window exceeded")
        elif kind == "window":
            self.sender.grant(f.window.increment)
        elif kind == "reset":
            error = self.cause = TunnelError(f.reset.code or "cancelled", f.reset.message)
            self.body.fail(error)
            self.sender.fail(error)
            self._forget()
            if self.task is not None:
                self.task.cancel()

    def respond(self, status: int, reason: str, headers: Iterable[tuple[str, str]], *, end_stream: bool) -> None:
        self.respond_head(frames.response_headers(status=status, reason=reason, headers=headers,
                                                  end_stream=end_stream, fields=self.stream.header_fields))

    def respond_head(self, head: frames.pb.Headers) -> None:
        """Send a response head built already (one passed on from another stream)."""
        self.responded = True
        self.status = head.status
        if self.watch is not None:
            self.watch.response_head(head)
        self.stream.push_encoded(frames.encode_head(self.request_id, self.trace_id, head, reply=True))
        if head.end_stream:
            self.sender.ended = True

    def reset(self, code: str, message: str = "") -> None:
        if self._closed:
            return
        if self.watch is not None:
            self.watch.reset(code)
        self.stream.push(frames.reset(self.request_id, self.trace_id, code, message, reply=True))
        error = TunnelError(code, message)
        self.body.fail(error)
        self.sender.fail(error)
        self._forget()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    def _forget(self) -> None:
        if not self._closed:
            self._closed = True
            self.stream.serving.pop(self.request_id, None)

    def finish(self) -> None:
        """The handler is done; an unfinished response becomes a RESET."""
        if self._closed:
            return
        if not self.sender.ended:
            self.reset("internal_error", "handler ended without a complete response")
        else:
            self._forget()


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
