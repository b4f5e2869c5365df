"""One tunnel stream: the same machinery on the gateway and on the client.

A stream multiplexes many requests over one transport. The read loop only
dispatches: a request from the peer gets its own task, a frame for a request
this end originated goes to that request's exchange. What is queued to send leaves
in batches, one gRPC message each (outbox.py). Every buffer is bounded: the outbound queue by
bytes (body writers wait once bodies fill half of it, a full queue makes new
requests fail with `overloaded`), each body by its flow-control window.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Awaitable, Callable

from gateway.tunnel import frames
from gateway.tunnel.errors import TransportClosed, TunnelError
from gateway.tunnel.exchange import InboundExchange, OutboundExchange
from gateway.tunnel.faults import FaultLog
from gateway.tunnel.outbox import StreamOutbox
from gateway.tunnel.pieces import Pieces, decode_message
from gateway.tunnel.stream_limits import StreamLimits
from gateway.tunnel.transport import Transport

__all__ = ["StreamLimits", "TunnelStream", "RequestHandler"]

log = logging.getLogger("gateway.tunnel")

RequestHandler = Callable[[InboundExchange], Awaitable[None]]
# Close reasons that are a fault (logged at warning); the rest are an orderly end.
_FAULTS = ("heartbeat_timeout", "message_too_large", "protocol_error", "transport_error", "write_failed",
           "connection_lost")


class TunnelStream(StreamOutbox):
    """Multiplexes requests in both directions over one transport (the sending half: outbox.py)."""

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
        # Group config versions: the one the peer applied, the one last sent, the last it refused and why.
        self.config_version = self.config_sent = ""; self.config_refused: tuple[str, str] = ("", "")
        self.peer_unhealthy: frozenset[str] = frozenset()  # upstreams the peer reports down
        self.header_fields = False  # the peer reads Headers.header_fields (capability HEADER_FIELDS)
        self.health_source: Callable[[], list[str]] | None = None  # ours, sent with each PING
        self.requests_originated = 0
        self.requests_served = 0
        self.unknown_frames = 0
        self.faults = FaultLog()  # what the peer got wrong, logged within bounds
        self._on_request = on_request
        self._on_control = on_control
        self._start_outbox()
        self._done = asyncio.Event()
        self._last_seen = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []

    # -- sending -----------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self.pending) + len(self.serving)

    # -- originating requests ------------------------------------------------

    def open_request(self, request_id: str, trace_id: str, *, end_stream: bool, head: frames.pb.Headers | None = None,
                     **fields: Any) -> OutboundExchange:
        """Send a request head: `head` as it is, else the one `frames.request_headers` makes of
        `fields`; raises TunnelError when the stream cannot take another request."""
        if self.closed or self.draining:
            raise TunnelError("tunnel_closed", f"tunnel to {self.peer_id} is closing")
        if len(self.pending) >= self.limits.max_inflight or self.queue_full:
            raise TunnelError("overloaded", f"tunnel to {self.peer_id} is at its in-flight limit")
        # Encoded first: a head protobuf refuses leaves nothing registered.
        if head is None:
            head = frames.request_headers(end_stream=end_stream, fields=self.header_fields, **fields)
        raw = frames.encode_head(request_id, trace_id, head, reply=False)
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
                self._stray(f, kind)
                return
            ex.on_frame(f, kind)
            return
        if kind == "headers":
            self._accept_request(f)
            return
        inbound = self.serving.get(rid)
        if inbound is None:
            self._stray(f, kind)
            return
        inbound.on_frame(f, kind)

    def _accept_request(self, f: frames.Frame) -> None:
        rid = f.request_id
        if rid in self.serving or not f.headers.method:
            self.unknown_frames += 1
            self.faults.report(self, "bad or duplicate request head", rid, f.trace_id)
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

    def _stray(self, f: frames.Frame | frames.DataFrame, what: str) -> None:
        """A frame for no request of ours: counted and logged within bounds, at info, for most
        are a race (sent before the peer read our RESET or our early answer), not a fault."""
        self.unknown_frames += 1
        self.faults.report(self, f"ignored a {what} frame for a request that ended or never was", f.request_id,
                           f.trace_id, logging.INFO)

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

    def feed(self, raw: bytes | Pieces) -> None:
        """Dispatch one received batch; raises frames.ProtocolError."""
        self._last_seen = time.monotonic()
        for f in decode_message(raw):
            self._dispatch(f)
        if self.draining:
            self._close_if_idle()

    async def _read_loop(self) -> None:
        reason = "closed_by_peer"
        read = getattr(self.transport, "read_batch", self.transport.read)
        try:
            while True:
                raw = await read()
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
            explain = getattr(self.transport, "known_end", None)
            known = exc if isinstance(exc, TransportClosed) else explain(exc) if explain else None
            reason = known.reason if known else f"transport_error: {type(exc).__name__}"
            if known:  # the transport knows why: the log says it, not "closed_by_peer" (a fault: at warning)
                log.log(logging.WARNING if reason.startswith(_FAULTS) else logging.INFO, "tunnel transport ended: %s",
                        known, extra={"peer": self.peer_id})
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
        if self._done.is_set():  # closed before it ran (its WELCOME never went): nothing is sent
            return await self._shutdown()
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
        log.log(logging.WARNING if self.close_reason.startswith(_FAULTS) else logging.INFO, "tunnel closed",
                extra={"peer": self.peer_id, "reason": self.close_reason})

