"""HTTP/2 framing of our own for the tunnel's gRPC calls, the part both ends
share (the client's end: h2_call.py; the gateway's: h2_server.py). A frame
header is read with one struct call, a DATA payload sliced out of what the
socket gave (a large one as it arrives), a message written as one DATA frame
whenever the windows allow. Messages queue on their stream for its reader, and
the stream's window is given back as the reader takes them, so a slow reader
holds the sender back instead of buffering without bound. HPACK (a call's
headers and trailers, once each) is the `hpack` library's.
"""
from __future__ import annotations

import asyncio
from typing import Any

from hpack import Decoder, Encoder, HPACKError

from gateway.tunnel.h2_frames import (
    ACK, CONNECTION_WINDOW, CONTINUATION, DATA, DEFAULT_WINDOW, END_HEADERS, END_STREAM, FRAME_HEAD,
    GIVE_BACK, GOAWAY, GOAWAY_HEAD, HEADERS, MAX_FRAME, MESSAGE_PREFIX, PADDED, PARTIAL_DATA, PING,
    PREFACE, PRIORITY_FLAG, PROTOCOL_ERROR, PUSH_PROMISE, RESET_STATUS, RST_STREAM, SETTINGS,
    SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTING_PAIR,
    STREAM_WINDOW, U32, WINDOW_UPDATE, Broken, CallFailed, H2Stream, frame)

__all__ = ["H2Connection"]


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection, either end: frames in and out, windows, PINGs.
    Subclasses say what headers and a stream's end mean (`on_headers`, `on_end_stream`)."""

    is_client = True

    def __init__(self, max_message: int, keepalive: float, patience: float) -> None:
        self.max_message = max_message
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self._buf = b""
        self.decoder = Decoder()
        self.decoder.max_allowed_table_size = 65536
        self.encoder = Encoder()
        self._header_block: list[bytes] = []
        self._header_flags = 0
        self._header_sid = 0
        self._data_left = 0  # bytes still to come of a DATA frame read in part, its flags and stream
        self._data_flags = 0
        self._data_stream: H2Stream | None = None
        self.unacked = 0  # the connection's DATA bytes not yet given back
        self.conn_send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self.window_opened: asyncio.Future | None = None
        self.drained: asyncio.Future | None = None
        self.paused = False
        self.closed: BaseException | None = None  # why the connection ended, once it has
        self._keepalive_every = keepalive
        self._patience = patience
        self._ping_out = False
        self._keepalive: asyncio.TimerHandle | None = None

    # -- connection events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        settings = [(SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW), (SETTINGS_MAX_FRAME_SIZE, MAX_FRAME)]
        if self.is_client:
            settings.append((SETTINGS_ENABLE_PUSH, 0))
        self.transport.write((PREFACE if self.is_client else b"")
                             + frame(SETTINGS, 0, 0, b"".join(SETTING_PAIR.pack(k, v) for k, v in settings))
                             + frame(WINDOW_UPDATE, 0, 0, U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW)))
        if self._keepalive_every > 0:
            self._keepalive = asyncio.get_running_loop().call_later(self._keepalive_every, self._ping)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(CallFailed("UNAVAILABLE", f"Connection lost: {exc}" if exc else "Socket closed"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_writers()

    def fail(self, error: BaseException) -> None:
        """End every call of the connection with `error` (those not ended already) and drop it."""
        if self.closed is None:
            self.closed = error
        if self._keepalive is not None:
            self._keepalive.cancel()
        for stream in self.streams.values():
            if not stream.remote_done or not self.is_client:
                stream.fail(error)
        self._wake_writers()
        if self.transport is not None:
            self.transport.abort()  # a dead peer would hold a graceful close until TCP gives up

    def _ping(self) -> None:
        if self.closed is not None:
            return
        self._ping_out = True
        self.transport.write(frame(PING, 0, 0, b"\0" * 8))
        self._keepalive = asyncio.get_running_loop().call_later(self._patience, self._ping_answered)

    def _ping_answered(self) -> None:
        if self._ping_out:
            self.fail(CallFailed("UNAVAILABLE", "keepalive watchdog timeout: the peer did not answer a PING"))
        else:
            self._keepalive = asyncio.get_running_loop().call_later(
                max(0.0, self._keepalive_every - self._patience), self._ping)

    # -- what subclasses say

    def on_headers(self, sid: int, fields: dict[str, str], end_stream: bool) -> None:
        raise NotImplementedError

    def on_end_stream(self, stream: H2Stream) -> None:
        raise NotImplementedError

    def stream_error(self, stream: H2Stream, error: CallFailed) -> None:
        """A call's own fault (an oversize or compressed message): by default, the connection's end."""
        raise error

    # -- reading frames

    def data_received(self, data: bytes) -> None:
        try:
            if self._data_left:  # inside a DATA frame's payload, read as it comes
                n = min(self._data_left, len(data))
                self._data_left -= n
                self._payload(self._data_stream, data, 0, n, 0 if self._data_left else self._data_flags)
                data = data[n:] if n < len(data) else b""
            buf = self._buf + data if self._buf else data
            pos, end = 0, len(buf)
            while end - pos >= 9:
                kind, flags, sid = FRAME_HEAD.unpack_from(buf, pos)
                length = kind >> 8
                stop = pos + 9 + length
                kind &= 0xFF
                if stop > end:
                    if length > MAX_FRAME:
                        raise Broken("FRAME_SIZE_ERROR", f"a frame of {length} bytes (at most {MAX_FRAME})")
                    if kind == DATA and not flags & PADDED and length > PARTIAL_DATA and not self._header_block:
                        # A large DATA frame: its payload so far now, the rest as it arrives
                        # (buffering the frame whole would copy it once a read).
                        self._data_left, self._data_flags = stop - end, flags
                        self._data_stream = self._on_data(buf, pos + 9, end, 0, sid)
                        pos = end
                    break
                if kind == DATA:
                    self._on_data(buf, pos + 9, stop, flags, sid)
                elif kind == HEADERS or kind == CONTINUATION:
                    self._on_headers(buf, pos + 9, stop, flags, sid, kind)
                elif self._header_block:
                    raise Broken("PROTOCOL_ERROR", "a frame inside a header block")
                else:
                    self._on_control(kind, flags, sid, buf[pos + 9:stop])
                pos = stop
        except Broken as exc:
            self.goaway(PROTOCOL_ERROR, exc.args[1])
            self.fail(CallFailed("INTERNAL", f"HTTP/2 {exc.args[0]}: {exc.args[1]}"))
            return
        except CallFailed as exc:
            self.fail(exc)
            return
        self._buf = buf[pos:] if pos < end else b""
        if self.unacked >= GIVE_BACK:
            self.transport.write(frame(WINDOW_UPDATE, 0, 0, U32.pack(self.unacked)))
            self.unacked = 0

    def _on_data(self, buf: bytes, start: int, stop: int, flags: int, sid: int) -> H2Stream | None:
        if self._header_block:
            raise Broken("PROTOCOL_ERROR", "a frame inside a header block")
        stream = self.streams.get(sid)
        if flags & PADDED:
            self.unacked += 1
            if stream is not None:
                stream.unacked += 1
            pad = buf[start] if start < stop else 256
            start += 1
            stop -= pad
            if stop < start:
                raise Broken("PROTOCOL_ERROR", "padding longer than the frame")
            self.unacked += pad
            if stream is not None:
                stream.unacked += pad
        self._payload(stream, buf, start, stop, flags)
        return stream

    def _payload(self, stream: H2Stream | None, buf: bytes, start: int, stop: int, flags: int) -> None:
        """DATA bytes of `stream`: messages out of them (`flags` END_STREAM: the frame's last)."""
        self.unacked += stop - start
        if stream is None or stream.error is not None or stream.remote_done:
            return  # counted against the connection's window and dropped
        stream.unacked += stop - start
        if stream.headers is None:
            raise Broken("PROTOCOL_ERROR", "DATA before the headers")
        try:
            stream.take(buf, start, stop, self.max_message)
        except CallFailed as exc:
            self.stream_error(stream, exc)
            return
        if flags & END_STREAM:
            if stream.missing or stream.head:
                self.stream_error(stream, CallFailed("INTERNAL", "the call ended inside a message"))
                return
            self.on_end_stream(stream)
        if stream.unacked >= GIVE_BACK:
            self.give_back(stream)
        if stream.messages:
            stream.wake()

    def _on_headers(self, buf: bytes, start: int, stop: int, flags: int, sid: int, kind: int) -> None:
        if kind == HEADERS:
            if self._header_block:
                raise Broken("PROTOCOL_ERROR", "HEADERS inside a header block")
            if flags & PADDED:
                pad = buf[start] if start < stop else 256
                start += 1
                stop -= pad
            if flags & PRIORITY_FLAG:
                start += 5
            if stop < start:
                raise Broken("PROTOCOL_ERROR", "a HEADERS frame shorter than its padding")
            self._header_flags, self._header_sid = flags, sid
        elif not self._header_block or sid != self._header_sid:
            raise Broken("PROTOCOL_ERROR", "CONTINUATION without HEADERS")
        self._header_block.append(buf[start:stop])
        if not flags & END_HEADERS:
            return
        block, self._header_block = b"".join(self._header_block), []
        try:
            fields = {name: value for name, value in self.decoder.decode(block)}
        except HPACKError as exc:  # the connection's HPACK state is lost with it
            raise Broken("COMPRESSION_ERROR", str(exc)) from None
        self.on_headers(sid, fields, bool(self._header_flags & END_STREAM))

    def _on_control(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if kind == SETTINGS:
            if flags & ACK or sid:
                return
            for i in range(0, len(payload) - 5, 6):
                key, value = SETTING_PAIR.unpack_from(payload, i)
                if key == SETTINGS_INITIAL_WINDOW_SIZE:
                    for stream in self.streams.values():
                        stream.send_window += value - self.peer_initial_window
                    self.peer_initial_window = value
                    self._wake_writers()
                elif key == SETTINGS_MAX_FRAME_SIZE:
                    self.peer_max_frame = value
            self.transport.write(frame(SETTINGS, ACK, 0, b""))
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise Broken("FRAME_SIZE_ERROR", "a WINDOW_UPDATE of the wrong size")
            step = U32.unpack(payload)[0] & 0x7FFFFFFF
            if sid == 0:
                self.conn_send_window += step
            elif (stream := self.streams.get(sid)) is not None:
                stream.send_window += step
            self._wake_writers()
        elif kind == PING:
            if flags & ACK:
                self._ping_out = False
            else:
                self.transport.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self.streams.get(sid)
            if stream is not None and not (stream.remote_done and self.is_client):
                code = U32.unpack(payload)[0] if len(payload) == 4 else PROTOCOL_ERROR
                stream.fail(CallFailed(RESET_STATUS.get(code, "INTERNAL"), f"the peer reset the call (HTTP/2 error {code})"))
                self._wake_writers()
        elif kind == GOAWAY and len(payload) >= 8:
            last, code = GOAWAY_HEAD.unpack_from(payload)
            detail = payload[8:].decode("utf-8", "replace")
            error = CallFailed("UNAVAILABLE", f"the peer sent GOAWAY (HTTP/2 error {code}) {detail}".rstrip())
            if code:
                raise error
            for stream in self.streams.values():  # a graceful one: the calls it names finish
                if stream.sid > (last & 0x7FFFFFFF):
                    stream.fail(error)
        elif kind == PUSH_PROMISE:
            raise Broken("PROTOCOL_ERROR", "PUSH_PROMISE: push is off")

    def give_back(self, stream: H2Stream) -> None:
        """Give the stream's window back for what arrived, once a quarter of it did and
        less than half of it waits to be read."""
        if stream.unacked >= GIVE_BACK and stream.queued < STREAM_WINDOW // 2 and stream.error is None:
            self.transport.write(frame(WINDOW_UPDATE, 0, stream.sid, U32.pack(stream.unacked)))
            stream.unacked = 0

    def _wake_writers(self) -> None:
        for waiter in (self.window_opened, self.drained):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    # -- calls: reading and writing messages

    async def next_message(self, stream: H2Stream) -> bytes | None:
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
            stream.waiter = asyncio.get_running_loop().create_future()
            await stream.waiter

    async def send_message(self, stream: H2Stream, raw: bytes) -> None:
        """One message on `stream`, as one DATA frame when the windows allow (the usual case)."""
        if stream.error is not None:
            raise stream.error
        size = len(raw)
        total = size + 5
        if total <= stream.send_window and total <= self.conn_send_window and total <= self.peer_max_frame:
            stream.send_window -= total
            self.conn_send_window -= total
            head = FRAME_HEAD.pack(total << 8 | DATA, 0, stream.sid) + MESSAGE_PREFIX.pack(0, size)
            if size <= 16384:
                self.transport.write(head + raw)
            else:
                self.transport.writelines((head, raw))
        else:
            await self._send_frames(stream, [memoryview(MESSAGE_PREFIX.pack(0, size)), memoryview(raw)], total)
        if self.paused:
            await self._drain(stream)

    async def _send_frames(self, stream: H2Stream, pieces: list[memoryview], remaining: int) -> None:
        """A message in DATA frames as large as the windows and the peer's frame size allow."""
        loop = asyncio.get_running_loop()
        while remaining:
            if stream.error is not None:
                raise stream.error
            n = min(stream.send_window, self.conn_send_window, self.peer_max_frame, remaining)
            if n <= 0:
                if self.window_opened is None or self.window_opened.done():
                    self.window_opened = loop.create_future()
                await self.window_opened
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
        while self.paused and stream.error is None and self.closed is None:
            if self.drained is None or self.drained.done():
                self.drained = asyncio.get_running_loop().create_future()
            await self.drained
        if stream.error is not None:
            raise stream.error

    def send_headers(self, sid: int, fields: list[tuple[str, str]], end_stream: bool = False) -> None:
        self.transport.write(frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid,
                                   self.encoder.encode(fields)))

    def reset(self, sid: int, code: int) -> None:
        self.transport.write(frame(RST_STREAM, 0, sid, U32.pack(code)))

    def goaway(self, code: int, detail: str = "", last: int = 0) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(GOAWAY, 0, 0, GOAWAY_HEAD.pack(last, code) + detail.encode()[:200]))
