"""A body's two halves on a tunnel stream: the reader grants flow-control
credit as chunks are consumed, the writer sends only within the credit granted."""
from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Callable

from gateway.tunnel import frames
from gateway.tunnel.errors import TunnelError

if TYPE_CHECKING:
    from gateway.tunnel.stream import TunnelStream

__all__ = ["BodyReader", "BodyWriter", "unchanging"]


def unchanging(chunk: bytes | bytearray | memoryview) -> bytes | memoryview:
    """`chunk` itself when nothing can change it later (bytes, or a view of bytes), else a copy."""
    if type(chunk) is bytes or (type(chunk) is memoryview and type(chunk.obj) is bytes):
        return chunk
    return bytes(chunk)


class BodyReader:
    """Receiving half of a body: chunks arrive from the read loop, a consumer
    takes them, and credit goes back to the sender as they are consumed."""

    __slots__ = ("_stream", "_rid", "_trace", "_reply", "_window", "_chunks", "_event", "_eof", "_error", "_credit_owed",
                 "_buffered", "tap")

    def __init__(self, stream: "TunnelStream", rid: str, trace: str, reply: bool, window: int) -> None:
        self._stream = stream
        self._rid = rid
        self._trace = trace
        self._reply = reply
        self._window = window
        self._chunks: collections.deque[bytes | memoryview] = collections.deque()
        # Made by the first read that has to wait: most bodies never do.
        self._event: asyncio.Event | None = None
        self._eof = False
        self._error: TunnelError | None = None
        self._credit_owed = 0
        self._buffered = 0
        # Told each chunk read, then None at the end.
        self.tap: Callable[[bytes | memoryview | None], None] | None = None

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def feed(self, chunk: bytes | memoryview, end: bool) -> bool:
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

    async def read(self, idle: float | None = None) -> bytes | memoryview | None:
        """The next chunk (a big one may be a read-only view: `frames.payload_view`), or None at
        the end of the body; TunnelError("timeout") when nothing arrives for `idle` seconds."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                if self.tap is not None:
                    self.tap(None)
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
        if self.tap is not None:
            self.tap(chunk)
        return chunk

    async def iter_chunks(self):
        while True:
            chunk = await self.read()
            if chunk is None:
                return
            yield chunk


class BodyWriter:
    """Sending half of a body: sends chunks while the peer has granted credit."""

    __slots__ = ("_stream", "_rid", "_trace", "_reply", "_credit", "_event", "_error", "ended", "bytes_sent", "tap")

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
        self.tap: Callable[[bytes | memoryview], None] | None = None  # told each chunk as it is written

    def grant(self, increment: int) -> None:
        self._credit += increment
        if self._event is not None:
            self._event.set()

    def fail(self, error: TunnelError) -> None:
        if self._error is None:
            self._error = error
        if self._event is not None:
            self._event.set()

    async def write(self, chunk: bytes | bytearray | memoryview, end: bool = False) -> None:
        """Send `chunk` within the credit granted; `end`: it is the last one (saves a frame)."""
        chunk = unchanging(chunk)  # queued until sent: the caller may reuse its buffer
        if self.tap is not None:
            self.tap(chunk)
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
