"""The sending half of a tunnel stream (mixed into TunnelStream): frames queued
without waiting, bounded by bytes, and sent as batches, one gRPC message each.

A batch leaves when the writer task comes round (after the loop turns that may
add to it: `_gather_turns`), or at once, written where it is queued, when it
holds `EARLY_FRAMES` frames and the transport can take it without waiting. The
second is what keeps requests flowing under load: many callers' requests arrive
in one loop turn, and without it none would leave before the last of them was
handled, so the peer, then the upstream, would idle and then get them all at
once. What it bought: docs/performance.md."""
from __future__ import annotations

import asyncio
import collections
import time
from typing import TYPE_CHECKING, Any

from gateway.tunnel import frames
from gateway.tunnel.errors import TunnelError

if TYPE_CHECKING:
    from gateway.tunnel.stream_limits import StreamLimits
    from gateway.tunnel.transport import Transport

__all__ = ["StreamOutbox", "EARLY_FRAMES"]

# Frames queued that make a batch leave at once (measured: docs/performance.md).
EARLY_FRAMES = 8

Queued = bytes | tuple[bytes | memoryview, ...]


class StreamOutbox:
    """The outbound queue and its writer; TunnelStream's state it reads is declared here."""

    transport: "Transport"
    limits: "StreamLimits"
    closed: bool
    draining: bool
    close_reason: str
    peer_id: str
    pending: dict[str, Any]
    serving: dict[str, Any]

    def _start_outbox(self) -> None:
        self.batches_out = 0
        self.frames_out = 0
        self.bytes_out = 0  # of gRPC messages sent
        self._out: collections.deque[Queued] = collections.deque()
        self._out_bytes = 0
        # A batch is being written, or the writer has not started (the stream's first message,
        # WELCOME, may still be on its way): nothing goes early (frames keep their order).
        self._writing = True
        self._write_now = getattr(self.transport, "write_now", None)
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

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

    def push_encoded(self, raw: Queued) -> None:
        """Queue an encoded frame, whole or in parts (`frames.encode_data`)."""
        if self.closed:
            return
        out = self._out
        out.append(raw)
        self._out_bytes += len(raw) if type(raw) is bytes else sum(map(len, raw))
        if self._out_bytes >= self.limits.body_queue_bytes:
            self._space.clear()
        self._wake.set()
        if len(out) >= EARLY_FRAMES and not self._writing and self._write_now is not None:
            parts, size, n_frames = self._take()
            try:
                written = self._write_now(parts, size)
            except Exception:  # the writer meets it too, and ends the stream saying why
                written = False
            if written:
                self._count(size, n_frames)
            else:  # it would wait (a window, a slow reader): back to the front, one item, for the writer
                out.appendleft(tuple(parts))
                self._out_bytes += size

    async def push_data(self, parts: tuple[bytes | memoryview, ...]) -> None:
        """Queue a body frame (`frames.encode_data`), waiting while the outbound queue is half
        full: the other half is for heads, credit and control, so bodies in flight (up to a
        window each) hold their senders back but never make the stream refuse a request."""
        while self._out_bytes >= self.limits.body_queue_bytes and not self.closed:
            await self._space.wait()
        if self.closed:
            raise TunnelError("tunnel_closed", f"tunnel to {self.peer_id} closed: {self.close_reason}")
        self.push_encoded(parts)

    def _take(self) -> tuple[list[bytes | memoryview], int, int]:
        """The next batch out of the queue: its parts, bytes and frames."""
        out = self._out
        limit = self.limits.max_batch_bytes
        parts: list[bytes | memoryview] = []
        size = n_frames = 0
        while out and size < limit:
            raw = out.popleft()
            n_frames += 1
            if type(raw) is bytes:
                parts.append(raw)
                size += len(raw)
            else:  # a DATA frame in parts
                parts += raw
                size += sum(map(len, raw))
        self._out_bytes -= size
        return parts, size, n_frames

    def _count(self, size: int, n_frames: int) -> None:
        """A batch went out."""
        if self._out_bytes < self.limits.body_queue_bytes:
            self._space.set()
        self.batches_out += 1
        self.frames_out += n_frames
        self.bytes_out += size

    async def _writer(self) -> None:
        out = self._out
        # A transport that writes a message in parts (ours, h2_send.py) spares the join's copy.
        write_parts = getattr(self.transport, "write_parts", None)
        self._writing = False
        while True:
            if not out:
                self._wake.clear()
                await self._wake.wait()
                await self._gather_turns()
                continue
            parts, size, n_frames = self._take()
            self._count(size, n_frames)
            self._writing = True
            try:
                await (write_parts(parts, size) if write_parts else self.transport.write(b"".join(parts)))
            finally:
                self._writing = False

    async def _gather_turns(self) -> None:
        """Let the frames of the next loop turns join the batch: one turn, no timer;
        while this end serves requests and each turn brings more (answers coming
        back from the upstream), up to three. What each bought: docs/performance.md."""
        out = self._out
        queued = len(out)
        await asyncio.sleep(0)
        turns = 1
        # Not once a message is full: the rest would only wait longer.
        while turns < 3 and self.serving and len(out) > queued and self._out_bytes < self.limits.max_batch_bytes:
            queued = len(out)
            await asyncio.sleep(0)
            turns += 1

    async def _flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._out and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
