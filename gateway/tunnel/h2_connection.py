"""HTTP/2 framing of our own for the tunnel's gRPC calls, the part both ends
share (the client's end: h2_call.py; the gateway's: h2_server.py). A frame
header is read with one struct call, a DATA payload sliced out of what the
socket gave (a large one as it arrives), a message written as one DATA frame
whenever the windows allow (h2_send.py). Messages queue on their stream for its
reader, and the stream's window is given back as the reader takes them, so a
slow reader holds the sender back instead of buffering without bound; a peer
that sends past a window, floods control frames or header blocks, or breaks
the framing loses the connection. HPACK (a call's headers and trailers, once
each) is the `hpack` library's.
"""
from __future__ import annotations

import asyncio
import logging

from hpack import Decoder, Encoder, HPACKError

from gateway.tunnel.h2_frames import (
    ACK, CONNECTION_WINDOW, CONTINUATION, DATA, DEFAULT_WINDOW, END_HEADERS, END_STREAM, ERROR_CODES, FRAME_HEAD,
    GIVE_BACK, GOAWAY, GOAWAY_HEAD, HEADERS, MAX_FRAME, MAX_HEADER_BLOCK, MAX_OWED, MAX_WINDOW, PADDED,
    PARTIAL_DATA, PING, PREFACE, PRIORITY_FLAG, PUSH_PROMISE, RESET_STATUS, RST_STREAM, SETTING_PAIR, SETTINGS,
    SETTINGS_ENABLE_PUSH, SETTINGS_HEADER_TABLE_SIZE, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE,
    SETTINGS_MAX_HEADER_LIST_SIZE, STREAM_WINDOW, U32, WINDOW_UPDATE, Broken, CallFailed, H2Stream, frame)
from gateway.tunnel.h2_send import H2Calls

__all__ = ["H2Connection"]

log = logging.getLogger("gateway.tunnel")


class H2Connection(H2Calls, asyncio.Protocol):
    """One HTTP/2 connection, either end: frames in and out, windows, PINGs.
    Subclasses say what headers and a stream's end mean (`on_headers`, `on_end_stream`)."""

    is_client = True

    def __init__(self, max_message: int, keepalive: float, patience: float) -> None:
        self.max_message = max_message
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self._pending: list[bytes] = []  # an incomplete frame's bytes so far, and how many it needs
        self._pending_size = 0
        self._need = 0
        self.decoder = Decoder(max_header_list_size=MAX_HEADER_BLOCK)
        self.decoder.max_allowed_table_size = 65536
        self.encoder = Encoder()
        self._header_block: list[bytes] = []
        self._header_size = 0
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
        self._owed = 0  # control frames answered since the peer last read
        self.closed: BaseException | None = None  # why the connection ended, once it has
        self._keepalive_every = keepalive
        self._patience = patience
        self._ping_out = False
        self._keepalive: asyncio.TimerHandle | None = None

    # -- connection events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Kept: asyncio.get_running_loop() is a getpid() system call each time on Python 3.11.
        self.loop = asyncio.get_running_loop()
        settings = [(SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW), (SETTINGS_MAX_FRAME_SIZE, MAX_FRAME),
                    (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK)]
        if self.is_client:
            settings.append((SETTINGS_ENABLE_PUSH, 0))
        self.transport.write((PREFACE if self.is_client else b"")
                             + frame(SETTINGS, 0, 0, b"".join(SETTING_PAIR.pack(k, v) for k, v in settings))
                             + frame(WINDOW_UPDATE, 0, 0, U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW)))
        if self._keepalive_every > 0:
            self._keepalive = self.loop.call_later(self._keepalive_every, self._ping)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(CallFailed("UNAVAILABLE", f"Connection lost: {exc}" if exc else "Socket closed"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._owed = 0
        self._wake_writers()

    def fail(self, error: BaseException, *, in_order: bool = False) -> None:
        """End every call of the connection with `error` and drop it; a call the peer
        ended in order still reads its end. `in_order`: what is written goes out first
        (a peer that reads nothing is cut after a second)."""
        if self.closed is None:
            self.closed = error
        if self._keepalive is not None:
            self._keepalive.cancel()
        for stream in self.streams.values():
            if stream.remote_done:
                stream.wake()
            else:
                stream.fail(error)
        self._wake_writers()
        if self.transport is None:
            return
        if in_order and not self.transport.is_closing():
            self.transport.close()
            self.loop.call_later(1.0, self.transport.abort)
        else:
            self.transport.abort()  # a dead peer would hold a graceful close until TCP gives up

    def is_open(self) -> bool:
        """Frames can still be written (the socket may close before connection_lost says so)."""
        return self.closed is None and self.transport is not None and not self.transport.is_closing()

    def fail_stream(self, stream: H2Stream, error: BaseException) -> None:
        stream.fail(error)
        self._wake_writers()  # a writer waiting for its window or a drain sees it

    def _ping(self) -> None:
        if not self.is_open():
            return
        self._ping_out = True
        self.transport.write(frame(PING, 0, 0, b"\0" * 8))
        self._keepalive = self.loop.call_later(self._patience, self._ping_answered)

    def _ping_answered(self) -> None:
        if self._ping_out:
            self.fail(CallFailed("UNAVAILABLE", "keepalive watchdog timeout: the peer did not answer a PING"))
        else:
            self._keepalive = self.loop.call_later(
                max(0.0, self._keepalive_every - self._patience), self._ping)

    def write_control(self, data: bytes) -> None:
        """A frame the peer's own frames ask for (ACKs, refusals): while it reads nothing, only so many."""
        if self.paused:
            self._owed += 1
            if self._owed > MAX_OWED:
                raise Broken("ENHANCE_YOUR_CALM", "the peer does not read what it asks for")
        if self.is_open():
            self.transport.write(data)

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
        if self.closed is not None:
            return  # what arrives after the end (bytes read before the socket closed) means nothing
        self._ping_out = False  # any bytes from the peer show it is alive (its ACK may queue behind DATA)
        if self._need:  # an incomplete frame: joined once, when whole
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size < self._need:
                return
            data = b"".join(self._pending)
            self._pending, self._pending_size, self._need = [], 0, 0
        try:
            self._frames(data)
        except Broken as exc:
            self.goaway(ERROR_CODES.get(exc.args[0], 1), exc.args[1], self.last_seen())
            self.fail(CallFailed("INTERNAL", f"HTTP/2 {exc.args[0]}: {exc.args[1]}"))
        except CallFailed as exc:
            self.fail(exc)
        except Exception as exc:  # noqa: BLE001  (a bug here must cost this connection, not the loop's protocol)
            log.exception("HTTP/2 connection failed")
            self.fail(CallFailed("INTERNAL", f"{type(exc).__name__}: {exc}"))

    def last_seen(self) -> int:
        """The last stream id the peer opened that this end took (a GOAWAY names it)."""
        return 0

    def _frames(self, buf: bytes) -> None:
        pos, end = 0, len(buf)
        if self._data_left:  # inside a DATA frame's payload, read as it comes
            pos = min(self._data_left, end)
            self._data_left -= pos
            self._payload(self._data_stream, buf, 0, pos, 0 if self._data_left else self._data_flags)
        while end - pos >= 9:
            kind, flags, sid = FRAME_HEAD.unpack_from(buf, pos)
            length = kind >> 8
            stop = pos + 9 + length
            kind &= 0xFF
            if stop > end:
                if length > MAX_FRAME:
                    raise Broken("FRAME_SIZE_ERROR", f"a frame of {length} bytes (at most {MAX_FRAME})")
                if (kind == HEADERS or kind == CONTINUATION) and self._header_size + length > MAX_HEADER_BLOCK:
                    raise Broken("ENHANCE_YOUR_CALM", f"a header block over {MAX_HEADER_BLOCK} bytes")
                if kind == DATA and not flags & PADDED and length > PARTIAL_DATA and not self._header_block:
                    # A large DATA frame: its payload so far now, the rest as it arrives
                    # (buffering the frame whole would copy it once a read).
                    self._data_left, self._data_flags = stop - end, flags
                    self._data_stream = self._on_data(buf, pos + 9, end, 0, sid)
                    pos = end
                else:
                    self._need = stop - pos
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
        if pos < end:
            self._pending = [buf[pos:]]
            self._pending_size = end - pos
            self._need = self._need or 9
        if self.unacked >= GIVE_BACK and self.is_open():
            self.transport.write(frame(WINDOW_UPDATE, 0, 0, U32.pack(self.unacked)))
            self.unacked = 0

    def _on_data(self, buf: bytes, start: int, stop: int, flags: int, sid: int) -> H2Stream | None:
        if self._header_block:
            raise Broken("PROTOCOL_ERROR", "a frame inside a header block")
        if not sid:
            raise Broken("PROTOCOL_ERROR", "DATA on stream 0")
        stream = self.streams.get(sid)
        if flags & PADDED:
            pad = buf[start] if start < stop else 256
            if stop - start - 1 < pad:
                raise Broken("PROTOCOL_ERROR", "padding longer than the frame")
            self.unacked += 1 + pad  # the padding counts against the windows too
            if stream is not None:
                stream.unacked += 1 + pad
            start += 1
            stop -= pad
        self._payload(stream, buf, start, stop, flags)
        return stream

    def _payload(self, stream: H2Stream | None, buf: bytes, start: int, stop: int, flags: int) -> None:
        """DATA bytes of `stream`: messages out of them (`flags` END_STREAM: the frame's last)."""
        self.unacked += stop - start
        # What is not given back yet is what the peer used of the windows we gave it.
        if self.unacked > CONNECTION_WINDOW:
            raise Broken("FLOW_CONTROL_ERROR", "the peer sent past the connection's window")
        if stream is None or stream.error is not None or stream.remote_done:
            return  # counted against the connection's window and dropped
        stream.unacked += stop - start
        if stream.unacked > STREAM_WINDOW:
            raise Broken("FLOW_CONTROL_ERROR", f"the peer sent past stream {stream.sid}'s window")
        if stream.headers is None:
            raise Broken("PROTOCOL_ERROR", "DATA before the headers")
        try:
            stream.take(buf, start, stop, self.max_message)
            if flags & END_STREAM:
                self.end_of(stream)
        except CallFailed as exc:
            self.stream_error(stream, exc)
            return
        if stream.unacked >= GIVE_BACK:
            self.give_back(stream)
        if stream.messages:
            stream.wake()

    def end_of(self, stream: H2Stream) -> None:
        """The peer ended its side of `stream`: not inside a message."""
        if stream.missing or stream.head:
            raise CallFailed("INTERNAL", "the call ended inside a message")
        self.on_end_stream(stream)

    def _on_headers(self, buf: bytes, start: int, stop: int, flags: int, sid: int, kind: int) -> None:
        if kind == HEADERS:
            if self._header_block:
                raise Broken("PROTOCOL_ERROR", "HEADERS inside a header block")
            if not sid:
                raise Broken("PROTOCOL_ERROR", "HEADERS on stream 0")
            if flags & PADDED:
                pad = buf[start] if start < stop else 256
                start += 1
                stop -= pad
            if flags & PRIORITY_FLAG:
                start += 5
            if stop < start:
                raise Broken("PROTOCOL_ERROR", "a HEADERS frame shorter than its padding")
            self._header_flags, self._header_sid, self._header_size = flags, sid, 0
        elif not self._header_block or sid != self._header_sid:
            raise Broken("PROTOCOL_ERROR", "CONTINUATION without HEADERS")
        self._header_size += stop - start
        if self._header_size > MAX_HEADER_BLOCK:
            raise Broken("ENHANCE_YOUR_CALM", f"a header block over {MAX_HEADER_BLOCK} bytes")
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
            self._on_settings(flags, sid, payload)
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise Broken("FRAME_SIZE_ERROR", "a WINDOW_UPDATE of the wrong size")
            step = U32.unpack(payload)[0] & 0x7FFFFFFF
            stream = self.streams.get(sid)
            if not step:
                raise Broken("PROTOCOL_ERROR", "a WINDOW_UPDATE of 0")
            if sid == 0:
                self.conn_send_window += step
                if self.conn_send_window > MAX_WINDOW:
                    raise Broken("FLOW_CONTROL_ERROR", "the connection's window past 2^31-1")
            elif stream is not None:
                stream.send_window += step
                if stream.send_window > MAX_WINDOW:
                    raise Broken("FLOW_CONTROL_ERROR", f"stream {sid}'s window past 2^31-1")
            self._wake_writers()
        elif kind == PING:
            if len(payload) != 8 or sid:
                raise Broken("FRAME_SIZE_ERROR" if sid == 0 else "PROTOCOL_ERROR", "a PING not of 8 bytes on stream 0")
            if flags & ACK:
                self._ping_out = False
            else:
                self.write_control(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self.streams.get(sid)
            if stream is not None:
                stream.reset = True
                if not (stream.remote_done and self.is_client):
                    code = U32.unpack(payload)[0] if len(payload) == 4 else 1
                    self.fail_stream(stream, CallFailed(RESET_STATUS.get(code, "INTERNAL"),
                                                        f"the peer reset the call (HTTP/2 error {code})"))
                self._wake_writers()
        elif kind == GOAWAY and len(payload) >= 8:
            last, code = GOAWAY_HEAD.unpack_from(payload)
            detail = payload[8:].decode("utf-8", "replace")
            error = CallFailed("UNAVAILABLE", f"the peer sent GOAWAY (HTTP/2 error {code}) {detail}".rstrip())
            if code:
                raise error
            # A graceful one: the calls it names finish. It names the streams its receiver opened,
            # so only a client's calls can be past it (a server opens none).
            for stream in self.streams.values() if self.is_client else ():
                if stream.sid > (last & 0x7FFFFFFF):
                    self.fail_stream(stream, error)
        elif kind == PUSH_PROMISE:
            raise Broken("PROTOCOL_ERROR", "PUSH_PROMISE: push is off")

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise Broken("PROTOCOL_ERROR", "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise Broken("FRAME_SIZE_ERROR", "SETTINGS of a length not a multiple of 6")
        for i in range(0, len(payload), 6):
            key, value = SETTING_PAIR.unpack_from(payload, i)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise Broken("FLOW_CONTROL_ERROR", "an initial window past 2^31-1")
                for stream in self.streams.values():
                    stream.send_window += value - self.peer_initial_window
                self.peer_initial_window = value
                self._wake_writers()
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not 16384 <= value <= 0xFFFFFF:
                    raise Broken("PROTOCOL_ERROR", f"a max frame size of {value}")
                self.peer_max_frame = value
            elif key == SETTINGS_HEADER_TABLE_SIZE:
                self.encoder.header_table_size = min(value, 4096)  # hpack says so in its next block
        self.write_control(frame(SETTINGS, ACK, 0, b""))

    def give_back(self, stream: H2Stream) -> None:
        """Give the stream's window back for what arrived, once a quarter of it did and
        less than half of it waits to be read."""
        if (stream.unacked >= GIVE_BACK and stream.queued < STREAM_WINDOW // 2 and stream.error is None
                and self.is_open()):
            self.transport.write(frame(WINDOW_UPDATE, 0, stream.sid, U32.pack(stream.unacked)))
            stream.unacked = 0

    def _wake_writers(self) -> None:
        for waiter in (self.window_opened, self.drained):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
