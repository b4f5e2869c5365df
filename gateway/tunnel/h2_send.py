"""The calls' side of our HTTP/2 connection (h2_connection.py): a stream's next
message for its reader, a message out as DATA frames within the windows, and
the frames a call starts and ends with."""
from __future__ import annotations

import asyncio
from typing import Any, Sequence

from gateway.tunnel.h2_frames import (DATA, END_HEADERS, END_STREAM, FRAME_HEAD, GIVE_BACK, GOAWAY, GOAWAY_HEAD,
                                      HEADERS, MESSAGE_PREFIX, RST_STREAM, U32, CallFailed, H2Stream, frame)
from gateway.tunnel.pieces import Pieces

__all__ = ["H2Calls"]


class H2Calls:
    """Reading and writing a connection's calls; mixed into H2Connection, whose state it uses."""

    transport: asyncio.Transport | None
    loop: asyncio.AbstractEventLoop
    closed: BaseException | None
    paused: bool
    conn_send_window: int
    peer_max_frame: int
    window_opened: asyncio.Future | None
    drained: asyncio.Future | None

    def give_back(self, stream: H2Stream) -> None:
        raise NotImplementedError

    def write_control(self, data: bytes) -> None:
        raise NotImplementedError

    async def next_message(self, stream: H2Stream) -> bytes | Pieces | None:
        """The stream's next message; None once the peer ended its side in order."""
        while True:
            if stream.messages:
                message = stream.messages.popleft()
                stream.queued -= len(message)
                if stream.unacked >= GIVE_BACK:
                    self.give_back(stream)
                return message
            if stream.error is not None:
                raise stream.error
            if stream.remote_done:
                return None
            stream.waiter = self.loop.create_future()
            await stream.waiter

    def is_open(self) -> bool:
        raise NotImplementedError

    def check_open(self, stream: H2Stream) -> None:
        """Raise what ended the call or its connection, if anything did: frames may go out now."""
        if stream.error is not None:
            raise stream.error
        if not self.is_open() or stream.reset:
            raise CallFailed("UNAVAILABLE", "the call or its connection has ended")

    async def send_message(self, stream: H2Stream, raw: bytes) -> None:
        """One message on `stream`, as one DATA frame when the windows allow (the usual case)."""
        await self.send_parts(stream, (raw,), len(raw))

    async def send_parts(self, stream: H2Stream, parts: Sequence[bytes | memoryview], size: int) -> None:
        """One message of `size` bytes given in parts (a batch of tunnel frames), written without joining them."""
        self.check_open(stream)
        total = size + 5
        if total <= stream.send_window and total <= self.conn_send_window and total <= self.peer_max_frame:
            self._write_message(stream, parts, size)
        else:
            await self._send_frames(stream, [memoryview(MESSAGE_PREFIX.pack(0, size)), *map(memoryview, parts)], total)
        if self.paused:
            await self._drain(stream)

    def send_parts_now(self, stream: H2Stream, parts: Sequence[bytes | memoryview], size: int) -> bool:
        """`send_parts` when it waits for nothing: the call open, the windows holding the
        message whole, the transport not paused; False (nothing written) otherwise."""
        total = size + 5
        if (self.paused or stream.error is not None or stream.reset or not self.is_open()
                or total > stream.send_window or total > self.conn_send_window or total > self.peer_max_frame):
            return False
        self._write_message(stream, parts, size)
        return True

    def _write_message(self, stream: H2Stream, parts: Sequence[bytes | memoryview], size: int) -> None:
        """A message as one DATA frame (the windows hold it: checked)."""
        total = size + 5
        stream.send_window -= total
        self.conn_send_window -= total
        head = FRAME_HEAD.pack(total << 8 | DATA, 0, stream.sid) + MESSAGE_PREFIX.pack(0, size)
        if size <= 16384:  # one small write: a join is cheaper than a writev of many parts
            self.transport.write(head + b"".join(parts))  # type: ignore[union-attr]
        else:
            self.transport.writelines((head, *parts))  # type: ignore[union-attr]

    async def _send_frames(self, stream: H2Stream, pieces: list[memoryview], remaining: int) -> None:
        """A message in DATA frames as large as the windows and the peer's frame size allow."""
        loop = self.loop
        while remaining:
            self.check_open(stream)
            n = min(stream.send_window, self.conn_send_window, self.peer_max_frame, remaining)
            if n <= 0:
                if self.window_opened is None or self.window_opened.done():
                    self.window_opened = loop.create_future()
                # Shielded: the future is every writer's; a cancelled one must not cancel it for the others.
                await asyncio.shield(self.window_opened)
                continue
            out: list[Any] = [FRAME_HEAD.pack(n << 8 | DATA, 0, stream.sid)]
            need = n
            while need:
                piece = pieces[0]
                if len(piece) <= need:
                    out.append(piece)
                    need -= len(piece)
                    del pieces[0]
                else:
                    out.append(piece[:need])
                    pieces[0] = piece[need:]
                    need = 0
            stream.send_window -= n
            self.conn_send_window -= n
            remaining -= n
            self.transport.writelines(out)
            if self.paused:
                await self._drain(stream)

    async def _drain(self, stream: H2Stream) -> None:
        while self.paused and stream.error is None and self.closed is None and not stream.reset:
            if self.drained is None or self.drained.done():
                self.drained = self.loop.create_future()
            await asyncio.shield(self.drained)  # as in _send_frames
        self.check_open(stream)

    def send_headers(self, sid: int, fields: list[tuple[str, str]], end_stream: bool = False) -> None:
        self.transport.write(frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid,
                                   self.encoder.encode(fields)))  # type: ignore[attr-defined]

    def reset(self, sid: int, code: int) -> None:
        self.write_control(frame(RST_STREAM, 0, sid, U32.pack(code)))

    def goaway(self, code: int, detail: str = "", last: int = 0) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(GOAWAY, 0, 0, GOAWAY_HEAD.pack(last, code) + detail.encode()[:200]))
