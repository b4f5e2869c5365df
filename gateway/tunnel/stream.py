"""One tunnel stream: the same machinery on the gateway and on the client.

A stream multiplexes many requests over one transport. The read loop only
dispatches: a request from the peer gets its own task, a frame for a request
this end originated goes to that request's exchange. A single writer task sends
everything queued as one batch. Every buffer is bounded: the outbound queue by
bytes (a full queue makes new requests fail with `overloaded` and makes body
writers wait), each body by its flow-control window.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from typing import Any, Awaitable, Callable, Iterable

from gateway.tunnel import frames
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.transport import Transport

__all__ = ["StreamLimits", "TunnelStream", "OutboundExchange", "InboundExchange", "BodyReader", "BodyWriter"]

log = logging.getLogger("gateway.tunnel")

RequestHandler = Callable[["InboundExchange"], Awaitable[None]]


class StreamLimits:
    """Sizes and bounds of one stream; both ends use the same defaults."""

    __slots__ = ("max_inflight", "window", "chunk_size", "max_batch_bytes", "max_queue_bytes", "heartbeat_interval")

    def __init__(
        self,
        *,
        max_inflight: int = 1000,
        window: int = 256 * 1024,
        chunk_size: int = 64 * 1024,
        max_batch_bytes: int = 1024 * 1024,
        max_queue_bytes: int = 8 * 1024 * 1024,
        heartbeat_interval: float = 5.0,
    ) -> None:
        self.max_inflight = max_inflight
        self.window = window
        self.chunk_size = chunk_size
        self.max_batch_bytes = max_batch_bytes
        self.max_queue_bytes = max_queue_bytes
        self.heartbeat_interval = heartbeat_interval


class BodyReader:
    """Receiving half of a body: chunks arrive from the read loop, a consumer
    takes them, and credit goes back to the sender as they are consumed."""

    __slots__ = ("_stream", "_rid", "_trace", "_reply", "_window", "_chunks", "_event", "_eof", "_error", "_credit_owed", "_buffered")

    def __init__(self, stream: "TunnelStream", rid: str, trace: str, reply: bool, window: int) -> None:
        self._stream = stream
        self._rid = rid
        self._trace = trace
        self._reply = reply
        self._window = window
        self._chunks: collections.deque[bytes] = collections.deque()
        # Made by the first read that has to wait: most bodies never do.
        self._event: asyncio.Event | None = None
        self._eof = False
        self._error: TunnelError | None = None
        self._credit_owed = 0
        self._buffered = 0

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def feed(self, chunk: bytes, end: bool) -> bool:
        """Accept a DATA frame; False when it exceeds the window granted."""
        if chunk:
            self._buffered += len(chunk)
            if self._buffered > self._window:
                return False
            self._chunks.append(chunk)
        if end:
            self._eof = True
        if self._event is not None:
            self._event.set()
        return True

    def fail(self, error: TunnelError) -> None:
        if self._error is None and not self._eof:
            self._error = error
        if self._event is not None:
            self._event.set()

    def take_complete(self) -> bytes | None:
        """The whole body when all of it has already arrived, else None (read it in chunks)."""
        if not self._eof or self._error is not None:
            return None
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    async def read(self, idle: float | None = None) -> bytes | None:
        """The next chunk, or None at the end of the body; TunnelError("timeout")
        when nothing arrives for `idle` seconds."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return None
            if self._event is None:
                self._event = asyncio.Event()
            else:
                self._event.clear()
            if idle is None:
                await self._event.wait()
            else:
                try:
                    async with asyncio.timeout(idle):
                        await self._event.wait()
                except TimeoutError:
                    raise TunnelError("timeout", f"no body data for {idle:g}s") from None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if not self._eof:
            self._credit_owed += len(chunk)
            # Grant in batches of half a window: fewer WINDOW frames, no stall.
            if self._credit_owed * 2 >= self._window:
                self._stream.push(frames.window(self._rid, self._trace, self._credit_owed, reply=self._reply))
                self._credit_owed = 0
        return chunk

    async def iter_chunks(self):
        while True:
            chunk = await self.read()
            if chunk is None:
                return
            yield chunk


class BodyWriter:
    """Sending half of a body: sends chunks while the peer has granted credit."""

    __slots__ = ("_stream", "_rid", "_trace", "_reply", "_credit", "_event", "_error", "ended", "bytes_sent")

    def __init__(self, stream: "TunnelStream", rid: str, trace: str, reply: bool, window: int) -> None:
        self._stream = stream
        self._rid = rid
        self._trace = trace
        self._reply = reply
        self._credit = window
        self._event: asyncio.Event | None = None  # made when the credit first runs out
        self._error: TunnelError | None = None
        self.ended = False
        self.bytes_sent = 0

    def grant(self, increment: int) -> None:
        self._credit += increment
        if self._event is not None:
            self._event.set()

    def fail(self, error: TunnelError) -> None:
        if self._error is None:
            self._error = error
        if self._event is not None:
            self._event.set()

    async def write(self, chunk: bytes, end: bool = False) -> None:
        """Send `chunk` within the credit granted; `end`: it is the last one (saves a frame)."""
        if type(chunk) is not bytes:
            chunk = bytes(chunk)  # queued until sent: the caller may reuse its buffer
        total = len(chunk)
        offset = 0
        size = self._stream.limits.chunk_size
        while offset < total:
            while self._credit <= 0:
                if self._error is not None:
                    raise self._error
                if self._event is None:
                    self._event = asyncio.Event()
                else:
                    self._event.clear()
                await self._event.wait()
            if self._error is not None:
                raise self._error
            n = min(total - offset, self._credit, size)
            # A chunk that fits whole goes as it is; a split one as views of it.
            piece = chunk if n == total else memoryview(chunk)[offset:offset + n]
            offset += n
            self._credit -= n
            self.bytes_sent += n
            last = end and offset == total
            await self._stream.push_data(frames.encode_data(self._rid, self._trace, piece, end_stream=last, reply=self._reply))
            if last:
                self.ended = True
        if end and not self.ended:
            self.end()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self._stream.push_encoded(frames.encode_data(self._rid, self._trace, b"", end_stream=True, reply=self._reply))


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
            self.head.set_result(f.headers)
            if f.headers.end_stream:
                self.body.feed(b"", True)
        elif kind == "reset":
            self.fail(TunnelError(f.reset.code or "reset", f.reset.message))
            self._forget()

    def _protocol_violation(self, message: str) -> None:
        self.fail(TunnelError("protocol_error", message))
        self.close()

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

    __slots__ = ("stream", "request_id", "trace_id", "head", "body", "sender", "task", "responded", "_closed", "started")

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

    def on_frame(self, f: frames.Frame | frames.DataFrame, kind: str) -> None:
        if kind == "data":
            if not self.body.feed(f.data, f.end_stream):
                self.reset("protocol_error", "flow control window exceeded")
        elif kind == "window":
            self.sender.grant(f.window.increment)
        elif kind == "reset":
            error = TunnelError(f.reset.code or "cancelled", f.reset.message)
            self.body.fail(error)
            self.sender.fail(error)
            self._forget()
            if self.task is not None:
                self.task.cancel()

    def respond(self, status: int, reason: str, headers: Iterable[tuple[str, str]], *, end_stream: bool) -> None:
        self.responded = True
        head = frames.response_headers(status=status, reason=reason, headers=headers, end_stream=end_stream,
                                       fields=self.stream.header_fields)
        self.stream.push_encoded(frames.encode_head(self.request_id, self.trace_id, head, reply=True))
        if end_stream:
            self.sender.ended = True

    def reset(self, code: str, message: str = "") -> None:
        if self._closed:
            return
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


class TunnelStream:
    """Multiplexes requests in both directions over one transport."""

    _nonces = itertools.count(1)

    def __init__(
        self,
        transport: Transport,
        *,
        limits: StreamLimits,
        on_request: RequestHandler,
        peer_id: str,
        group: str = "",
        label: str = "",
        on_control: Callable[[frames.Frame, str], None] | None = None,
    ) -> None:
        self.transport = transport
        # Kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11.
        self.loop = asyncio.get_running_loop()
        self.limits = limits
        self.peer_id = peer_id
        self.group = group
        self.label = label or peer_id
        self.pending: dict[str, OutboundExchange] = {}
        self.serving: dict[str, InboundExchange] = {}
        self.draining = False
        self.closed = False
        self.close_reason = ""
        self.connected_at = time.time()
        self.peer_inflight = 0
        self.config_version = ""  # the group config the peer applied
        self.peer_unhealthy: frozenset[str] = frozenset()  # upstreams the peer reports down
        self.header_fields = False  # the peer reads Headers.header_fields (capability HEADER_FIELDS)
        self.health_source: Callable[[], list[str]] | None = None  # ours, sent with each PING
        self.requests_originated = 0
        self.requests_served = 0
        self.unknown_frames = 0
        self.batches_out = 0
        self.frames_out = 0
        self.bytes_out = 0  # of gRPC messages sent
        self._on_request = on_request
        self._on_control = on_control
        self._out: collections.deque[bytes | tuple[bytes | memoryview, ...]] = collections.deque()
        self._out_bytes = 0
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._done = asyncio.Event()
        self._last_seen = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []

    # -- sending -----------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self.pending) + len(self.serving)

    @property
    def filling_batch(self) -> bool:
        """Frames wait for the writer and their gRPC message has room: a
        request sent now shares it. Not when the stream is at a limit, or holds
        more than a message already (a body queued behind a slow peer)."""
        return (bool(self._out) and self._out_bytes < self.limits.max_batch_bytes
                and len(self.pending) < self.limits.max_inflight and not self.draining and not self.closed)

    @property
    def queue_full(self) -> bool:
        return self._out_bytes >= self.limits.max_queue_bytes

    def push(self, frame: frames.Frame) -> None:
        """Queue a frame without waiting (heads, control, credit, resets)."""
        self.push_encoded(frames.encode_frame(frame))

    def push_encoded(self, raw: bytes | tuple[bytes | memoryview, ...]) -> None:
        """Queue an encoded frame, whole or in parts (`frames.encode_data`)."""
        if self.closed:
            return
        self._out.append(raw)
        self._out_bytes += len(raw) if type(raw) is bytes else sum(map(len, raw))
        if self._out_bytes >= self.limits.max_queue_bytes:
            self._space.clear()
        self._wake.set()

    async def push_data(self, parts: tuple[bytes | memoryview, ...]) -> None:
        """Queue a body frame (`frames.encode_data`), waiting while the outbound queue is full."""
        while self._out_bytes >= self.limits.max_queue_bytes and not self.closed:
            await self._space.wait()
        if self.closed:
            raise TunnelError("tunnel_closed", f"tunnel to {self.peer_id} closed: {self.close_reason}")
        self.push_encoded(parts)

    async def _writer(self) -> None:
        out = self._out
        limit = self.limits.max_batch_bytes
        while True:
            if not out:
                self._wake.clear()
                await self._wake.wait()
                await self._gather_turns()
                continue
            parts = []
            size = 0
            n_frames = 0
            while out and size < limit:
                n_frames += 1
                raw = out.popleft()
                if type(raw) is bytes:
                    parts.append(raw)
                    size += len(raw)
                else:  # a DATA frame in parts
                    parts += raw
                    size += sum(map(len, raw))
            self._out_bytes -= size
            if self._out_bytes < self.limits.max_queue_bytes:
                self._space.set()
            self.batches_out += 1
            self.frames_out += n_frames
            self.bytes_out += size
            await self.transport.write(b"".join(parts))

    async def _gather_turns(self) -> None:
        """Let the frames of the next loop turns join the batch: one turn, no timer;
        while this end serves requests and each turn brings more (answers coming
        back from the upstream), up to three. A gRPC message costs its writer and
        reader 40-260 us of CPU whatever it holds (scripts/bench_floor.py); this
        gave 1.06x requests/s at c64 over 12 alternating rounds and 4-8 % less
        CPU a request on both ends. (Waiting a second turn whether or not more
        came kept the peer waiting: 5 % fewer requests/s.)"""
        out = self._out
        queued = len(out)
        await asyncio.sleep(0)
        turns = 1
        # Not once a message is full: the rest would only wait longer.
        while turns < 3 and self.serving and len(out) > queued and self._out_bytes < self.limits.max_batch_bytes:
            queued = len(out)
            await asyncio.sleep(0)
            turns += 1

    # -- originating requests ------------------------------------------------

    def open_request(self, request_id: str, trace_id: str, *, end_stream: bool, **head: Any) -> OutboundExchange:
        """Send a request head (the fields of `frames.request_headers`); raises
        TunnelError when the stream cannot take another request."""
        if self.closed or self.draining:
            raise TunnelError("tunnel_closed", f"tunnel to {self.peer_id} is closing")
        if len(self.pending) >= self.limits.max_inflight or self.queue_full:
            raise TunnelError("overloaded", f"tunnel to {self.peer_id} is at its in-flight limit")
        # Encoded first: a head protobuf refuses leaves nothing registered.
        raw = frames.encode_head(
            request_id, trace_id, frames.request_headers(end_stream=end_stream, fields=self.header_fields, **head),
            reply=False)
        ex = OutboundExchange(self, request_id, trace_id)
        self.pending[request_id] = ex
        self.requests_originated += 1
        self.push_encoded(raw)
        if end_stream:
            ex.sender.ended = True
        return ex

    # -- receiving -----------------------------------------------------------

    def _dispatch(self, f: frames.Frame | frames.DataFrame) -> None:
        kind = "data" if type(f) is frames.DataFrame else f.WhichOneof("kind")
        rid = f.request_id
        if not rid:
            self._control(f, kind)
            return
        if f.reply:
            ex = self.pending.get(rid)
            if ex is None:
                self.unknown_frames += 1
                return
            ex.on_frame(f, kind)
            return
        if kind == "headers":
            self._accept_request(f)
            return
        inbound = self.serving.get(rid)
        if inbound is None:
            self.unknown_frames += 1
            return
        inbound.on_frame(f, kind)

    def _accept_request(self, f: frames.Frame) -> None:
        rid = f.request_id
        if rid in self.serving or not f.headers.method:
            self.unknown_frames += 1
            self.push(frames.reset(rid, f.trace_id, "protocol_error", "bad or duplicate request head", reply=True))
            return
        if self.draining or self.closed:
            self.push(frames.reset(rid, f.trace_id, "tunnel_closed", "stream is draining", reply=True))
            return
        if len(self.serving) >= self.limits.max_inflight:
            self.push(frames.reset(rid, f.trace_id, "overloaded", "in-flight limit reached", reply=True))
            return
        ex = InboundExchange(self, rid, f.trace_id, f.headers)
        if f.headers.end_stream:
            ex.body.feed(b"", True)
        self.serving[rid] = ex
        self.requests_served += 1
        ex.task = self.loop.create_task(self._serve(ex))

    async def _serve(self, ex: InboundExchange) -> None:
        try:
            await self._on_request(ex)
        except asyncio.CancelledError:
            pass
        except TunnelError as exc:
            ex.reset(exc.code, exc.message)
        except Exception as exc:  # a handler bug must not kill the stream
            log.exception("request handler failed", extra={"request_id": ex.request_id, "trace_id": ex.trace_id})
            ex.reset("internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            ex.finish()

    def _control(self, f: frames.Frame, kind: str) -> None:
        if kind == "ping":
            self.peer_inflight = f.ping.inflight
            if f.ping.health_report:
                unhealthy = frozenset(f.ping.unhealthy_upstreams)
                if unhealthy != self.peer_unhealthy:
                    self.peer_unhealthy = unhealthy
                    if self._on_control is not None:
                        self._on_control(f, "health")
            if not f.ping.ack:
                self.push(frames.ping(f.ping.nonce, ack=True, inflight=self.inflight))
        elif kind == "goaway":
            self.draining = True
            log.info("peer sent GOAWAY", extra={"peer": self.peer_id, "reason": f.goaway.reason})
            if self._on_control is not None:
                self._on_control(f, kind)
            self._close_if_idle()
        elif self._on_control is not None:
            self._on_control(f, kind)
        else:
            self.unknown_frames += 1

    def feed(self, raw: bytes) -> None:
        """Dispatch one received batch; raises frames.ProtocolError."""
        self._last_seen = time.monotonic()
        for f in frames.decode_frames(raw):
            self._dispatch(f)
        if self.draining:
            self._close_if_idle()

    async def _read_loop(self) -> None:
        reason = "closed_by_peer"
        try:
            while True:
                raw = await self.transport.read()
                if raw is None:
                    break
                self.feed(raw)
        except frames.ProtocolError as exc:
            reason = "protocol_error"
            log.warning("closing tunnel: %s", exc, extra={"peer": self.peer_id})
            self.push(frames.goaway("protocol_error"))
            await self._flush(0.5)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = f"transport_error: {type(exc).__name__}"
        self.close(reason)

    async def _heartbeat(self) -> None:
        interval = self.limits.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - self._last_seen > 3 * interval:
                log.warning("peer missed 3 heartbeats", extra={"peer": self.peer_id})
                self.close("heartbeat_timeout")
                return
            self.send_ping()

    def send_ping(self) -> None:
        """A PING now, with our health report when we have one."""
        unhealthy = self.health_source() if self.health_source is not None else None
        self.push(frames.ping(next(self._nonces), ack=False, inflight=self.inflight, unhealthy=unhealthy))

    async def _flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._out and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # -- lifecycle -----------------------------------------------------------

    def _close_if_idle(self) -> None:
        if self.draining and not self.pending and not self.serving:
            self.close("drained")

    def close(self, reason: str) -> None:
        """End the stream; every request on it fails with `tunnel_closed`."""
        if not self._done.is_set():
            self.close_reason = reason
            self._done.set()

    async def goaway(self, reason: str, grace: float) -> None:
        """Ask the peer to stop using this stream, let in-flight requests finish."""
        self.draining = True
        self.push(frames.goaway(reason))
        deadline = time.monotonic() + grace
        while (self.pending or self.serving) and time.monotonic() < deadline and not self._done.is_set():
            await asyncio.sleep(0.05)
        await self._flush(1.0)
        self.close(reason)

    async def run(self) -> None:
        """Serve the stream until it closes; then fail or cancel what is on it."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_loop()), loop.create_task(self._writer())]
        if self.limits.heartbeat_interval > 0:
            self._tasks.append(loop.create_task(self._heartbeat()))
        try:
            done_wait = loop.create_task(self._done.wait())
            await asyncio.wait([done_wait, self._tasks[1]], return_when=asyncio.FIRST_COMPLETED)
            if not self._done.is_set():
                exc = self._tasks[1].exception() if not self._tasks[1].cancelled() else None
                self.close(f"write_failed: {type(exc).__name__}" if exc else "write_failed")
            done_wait.cancel()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        if not self.close_reason:
            self.close_reason = "cancelled"
        self.closed = True
        self._done.set()
        self._space.set()
        for t in self._tasks:
            t.cancel()
        error = TunnelError("tunnel_closed", f"tunnel to {self.peer_id} closed: {self.close_reason}")
        for ex in list(self.pending.values()):
            ex.fail(error)
        self.pending.clear()
        handlers = []
        for inbound in list(self.serving.values()):
            inbound.body.fail(error)
            inbound.sender.fail(error)
            if inbound.task is not None:
                inbound.task.cancel()
                handlers.append(inbound.task)
        self.serving.clear()
        if handlers:
            await asyncio.wait(handlers, timeout=2.0)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("tunnel closed", extra={"peer": self.peer_id, "reason": self.close_reason})
