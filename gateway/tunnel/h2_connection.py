"""HTTP/2 framing for the client's end of the tunnel: one connection to a
gateway node carrying one gRPC call on stream 1 (gateway/tunnel/h2_call.py
drives it). A frame header is read with one struct call and a DATA payload
sliced out of what the socket gave; messages queue for the call's reader, and
the window is given back as it reads them. HPACK (the call's headers and
trailers, once each) is the `hpack` library's.
"""
from __future__ import annotations

import asyncio
import struct
from collections import deque
from urllib.parse import unquote

from hpack import Decoder, Encoder, HPACKError

from gateway import __version__
from gateway.tunnel.transport import CLIENT_KEEPALIVE_MS, METHOD

__all__ = ["CallFailed", "H2Connection", "STREAM_WINDOW", "MAX_FRAME", "FRAME_HEAD", "MESSAGE_PREFIX", "U32", "frame",
           "request_headers", "split_node"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# What the gateway may send ahead of our reads, and the largest DATA frame we
# take (grpcio frames a message by the reader's maximum).
STREAM_WINDOW = 8 << 20
MAX_FRAME = 1 << 20
DEFAULT_WINDOW = 65535
GIVE_BACK = STREAM_WINDOW // 4
PARTIAL_DATA = 65536  # a DATA frame larger than this is read as it arrives, not buffered whole
FRAME_HEAD = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
MESSAGE_PREFIX = struct.Struct(">BI")  # every gRPC message: compressed flag, length
_SETTING = struct.Struct(">HI")
U32 = struct.Struct(">I")
_GOAWAY = struct.Struct(">II")
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 1, 2, 4, 5
CALL = 1  # the call's stream id: one call a connection
STATUS_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
                "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
# An RST_STREAM's HTTP/2 error code as the gRPC status grpcio's client reports for it.
_RESET_STATUS = {7: "UNAVAILABLE", 8: "CANCELLED", 11: "RESOURCE_EXHAUSTED", 12: "PERMISSION_DENIED"}
_USER_AGENT = f"tunnel-client/{__version__}"


class CallFailed(ConnectionError):
    """The call ended with a gRPC status other than OK, or its connection was
    lost: `code` is the status name as grpcio says it (UNAVAILABLE...). A
    ConnectionError, so what catches OSError around a connect catches it."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection to a gateway node, carrying the call on stream 1."""

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._decoder = Decoder()
        self._decoder.max_allowed_table_size = 65536
        self._header_block: list[bytes] = []
        self._header_end = False  # the block in progress ends the stream
        self.messages: deque[bytes] = deque()
        self.queued = 0  # bytes of messages not yet read
        self._partial: list[bytes] = []  # a message spanning DATA frames, and how much of it is missing
        self._missing = 0
        self._head = b""  # a message prefix split between frames
        self._data_left = 0  # bytes still to come of a DATA frame read in part, its flags and stream
        self._data_flags = 0
        self._data_sid = CALL
        self.waiter: asyncio.Future | None = None
        self.unacked = 0  # DATA bytes received and not yet given back as window
        self.send_window = DEFAULT_WINDOW
        self.conn_send_window = DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self.window_opened: asyncio.Future | None = None
        self.drained: asyncio.Future | None = None
        self.paused = False
        self.headers: dict[str, str] | None = None
        self.ended = False  # the gateway ended the call (trailers read, or the connection gone)
        self.error: CallFailed | None = None
        self._ping_sent: float | None = None
        self._keepalive: asyncio.TimerHandle | None = None

    # -- connection events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        settings = b"".join(_SETTING.pack(k, v) for k, v in (
            (SETTINGS_ENABLE_PUSH, 0), (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW), (SETTINGS_MAX_FRAME_SIZE, MAX_FRAME)))
        self.transport.write(PREFACE + frame(SETTINGS, 0, 0, settings)
                             + frame(WINDOW_UPDATE, 0, 0, U32.pack(STREAM_WINDOW - DEFAULT_WINDOW)))
        self._keepalive = asyncio.get_running_loop().call_later(CLIENT_KEEPALIVE_MS / 1000, self._ping)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        if not self.ended:
            self.fail(CallFailed("UNAVAILABLE", f"Connection lost: {exc}" if exc else "Socket closed"))
        self._wake_writer()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def fail(self, error: CallFailed) -> None:
        """End the call with `error` (when it has not ended), wake its reader and writer, drop the connection."""
        if self.error is None and not self.ended:
            self.error = error
        self.ended = True
        self._wake_reader()
        self._wake_writer()
        if self.transport is not None:
            self.transport.abort()  # a dead peer would hold a graceful close until TCP gives up

    def _ping(self) -> None:
        loop = asyncio.get_running_loop()
        if self._ping_sent is not None:
            self.fail(CallFailed("UNAVAILABLE", "keepalive watchdog timeout: the gateway did not answer a PING"))
            return
        self._ping_sent = loop.time()
        self.transport.write(frame(PING, 0, 0, b"\0" * 8))
        self._keepalive = loop.call_later(max(1.0, CLIENT_KEEPALIVE_MS / 2000), self._ping_due)

    def _ping_due(self) -> None:
        if self._ping_sent is not None:
            self._ping()  # still unanswered: fails
        else:
            self._keepalive = asyncio.get_running_loop().call_later(CLIENT_KEEPALIVE_MS / 2000, self._ping)

    # -- reading frames

    def data_received(self, data: bytes) -> None:
        try:
            if self._data_left:  # inside a DATA frame's payload, read as it comes
                n = min(self._data_left, len(data))
                self._data_left -= n
                self._payload(data, 0, n, 0 if self._data_left else self._data_flags)
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
                        raise _Broken("FRAME_SIZE_ERROR", f"a frame of {length} bytes (at most {MAX_FRAME})")
                    if kind == DATA and not flags & PADDED and length > PARTIAL_DATA:
                        # A large DATA frame: its payload so far now, the rest as it arrives
                        # (buffering the frame whole would copy it once a read).
                        self._data_left, self._data_flags = stop - end, flags
                        self._on_data(buf, pos + 9, end, 0, sid)
                        pos = end
                    break
                if kind == DATA:
                    self._on_data(buf, pos + 9, stop, flags, sid)
                elif kind == HEADERS or kind == CONTINUATION:
                    self._on_headers(buf, pos + 9, stop, flags, sid, kind)
                elif self._header_block:
                    raise _Broken("PROTOCOL_ERROR", "a frame inside a header block")
                else:
                    self._on_control(kind, flags, sid, buf[pos + 9:stop])
                pos = stop
        except _Broken as exc:
            self.fail(CallFailed("INTERNAL", f"HTTP/2 {exc.args[0]}: {exc.args[1]}"))
            return
        except CallFailed as exc:
            self.fail(exc)
            return
        self._buf = buf[pos:] if pos < end else b""
        if self.unacked >= GIVE_BACK:
            self.give_back()
        if self.messages:
            self._wake_reader()

    def _on_data(self, buf: bytes, start: int, stop: int, flags: int, sid: int) -> None:
        if flags & PADDED:
            self.unacked += stop - start
            pad = buf[start] if start < stop else 256
            start += 1
            stop -= pad
            if stop < start:
                raise _Broken("PROTOCOL_ERROR", "padding longer than the frame")
            self.unacked -= stop - start  # counted by _payload
        if self.headers is None and sid == CALL and not self.ended:
            raise _Broken("PROTOCOL_ERROR", "DATA before the response headers")
        self._data_sid = sid
        self._payload(buf, start, stop, flags)

    def _payload(self, buf: bytes, start: int, stop: int, flags: int) -> None:
        """DATA bytes of the call: messages out of them (`flags` END_STREAM: the frame's last)."""
        self.unacked += stop - start
        if self._data_sid != CALL or self.ended:
            return  # counted against the window and dropped
        while start < stop:
            if self._missing:  # a message begun in an earlier frame or read
                take = min(self._missing, stop - start)
                self._partial.append(buf[start:start + take])
                start += take
                self._missing -= take
                if not self._missing:
                    self._deliver(b"".join(self._partial))
                    self._partial = []
                continue
            if self._head or stop - start < 5:
                take = min(5 - len(self._head), stop - start)
                self._head += buf[start:start + take]
                start += take
                if len(self._head) < 5:
                    continue
                flag, size = MESSAGE_PREFIX.unpack(self._head)
                self._head = b""
            else:
                flag, size = MESSAGE_PREFIX.unpack_from(buf, start)
                start += 5
            if flag:
                raise CallFailed("INTERNAL", "a compressed message: the tunnel sends none")
            if size > self.max_message:
                raise CallFailed("RESOURCE_EXHAUSTED", f"Received message larger than max ({size} vs. {self.max_message})")
            if stop - start >= size:
                self._deliver(buf[start:start + size])
                start += size
            else:
                self._missing = size
        if flags & END_STREAM:
            self._end({})

    def _deliver(self, message: bytes) -> None:
        self.messages.append(message)
        self.queued += len(message)

    def _on_headers(self, buf: bytes, start: int, stop: int, flags: int, sid: int, kind: int) -> None:
        if kind == HEADERS:
            if self._header_block:
                raise _Broken("PROTOCOL_ERROR", "HEADERS inside a header block")
            if flags & PADDED:
                pad = buf[start]
                start += 1
                stop -= pad
            if flags & PRIORITY_FLAG:
                start += 5
            if stop < start:
                raise _Broken("PROTOCOL_ERROR", "a HEADERS frame shorter than its padding")
            self._header_end = bool(flags & END_STREAM)
        elif not self._header_block:
            raise _Broken("PROTOCOL_ERROR", "CONTINUATION without HEADERS")
        self._header_block.append(buf[start:stop])
        if not flags & END_HEADERS:
            return
        block, self._header_block = b"".join(self._header_block), []
        try:
            fields = {name: value for name, value in self._decoder.decode(block)}
        except HPACKError as exc:  # the connection's HPACK state is lost with it
            raise _Broken("COMPRESSION_ERROR", str(exc)) from None
        if sid != CALL or self.ended:
            return
        if self.headers is None:
            self.headers = fields
            if fields.get(":status") != "200":
                raise CallFailed("UNAVAILABLE", f"the gateway answered HTTP status {fields.get(':status')}")
            if self._header_end or "grpc-status" in fields:  # trailers only: the call ended before a message
                self._end(fields)
        elif self._header_end:
            self._end(fields)
        else:
            raise _Broken("PROTOCOL_ERROR", "trailers without END_STREAM")

    def _end(self, trailers: dict[str, str]) -> None:
        """The gateway ended the call: with OK, `read` returns what is queued and then None."""
        if self._missing or self._head:
            raise CallFailed("INTERNAL", "the call ended inside a message")
        code = trailers.get("grpc-status")
        if code is None:
            raise CallFailed("UNKNOWN", "the call ended without a status")
        if code != "0":
            name = STATUS_NAMES[int(code)] if code.isdigit() and int(code) < len(STATUS_NAMES) else f"STATUS_{code}"
            raise CallFailed(name, unquote(trailers.get("grpc-message", "")))
        self.ended = True
        self._wake_reader()

    def _on_control(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if kind == SETTINGS:
            if flags & ACK or sid:
                return
            for i in range(0, len(payload) - 5, 6):
                key, value = _SETTING.unpack_from(payload, i)
                if key == SETTINGS_INITIAL_WINDOW_SIZE:
                    self.send_window += value - self._initial_send
                    self._initial_send = value
                    self._wake_writer()
                elif key == SETTINGS_MAX_FRAME_SIZE:
                    self.peer_max_frame = value
            self.transport.write(frame(SETTINGS, ACK, 0, b""))
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise _Broken("FRAME_SIZE_ERROR", "a WINDOW_UPDATE of the wrong size")
            step = U32.unpack(payload)[0] & 0x7FFFFFFF
            if sid == 0:
                self.conn_send_window += step
            elif sid == CALL:
                self.send_window += step
            self._wake_writer()
        elif kind == PING:
            if flags & ACK:
                self._ping_sent = None
            else:
                self.transport.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM and sid == CALL and not self.ended:
            code = U32.unpack(payload)[0] if len(payload) == 4 else 2
            raise CallFailed(_RESET_STATUS.get(code, "INTERNAL"), f"the gateway reset the call (HTTP/2 error {code})")
        elif kind == GOAWAY and len(payload) >= 8:
            last, code = _GOAWAY.unpack_from(payload)
            if code or (last & 0x7FFFFFFF) < CALL:  # not a graceful one that lets the call finish
                detail = payload[8:].decode("utf-8", "replace")
                raise CallFailed("UNAVAILABLE", f"the gateway sent GOAWAY (HTTP/2 error {code}) {detail}".rstrip())
        elif kind == PUSH_PROMISE:
            raise _Broken("PROTOCOL_ERROR", "PUSH_PROMISE: push is off")

    _initial_send = DEFAULT_WINDOW

    def give_back(self) -> None:
        """Give the window back for what was read, once it is a quarter of it."""
        if self.unacked >= GIVE_BACK and self.queued < STREAM_WINDOW // 2 and not self.ended:
            step = U32.pack(self.unacked)
            self.unacked = 0
            self.transport.write(frame(WINDOW_UPDATE, 0, 0, step) + frame(WINDOW_UPDATE, 0, CALL, step))

    def _wake_reader(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        for waiter in (self.window_opened, self.drained):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


class _Broken(Exception):
    """A connection error: (HTTP/2 error name, what)."""


def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    return FRAME_HEAD.pack(len(payload) << 8 | kind, flags, sid) + payload


def request_headers(scheme: str, authority: str) -> bytes:
    headers = [(":method", "POST"), (":scheme", scheme), (":path", METHOD), (":authority", authority),
               ("te", "trailers"), ("content-type", "application/grpc"), ("user-agent", _USER_AGENT)]
    return Encoder().encode(headers)


def split_node(node: str) -> tuple[str, int]:
    host, _, port = node.rpartition(":")
    return host.strip("[]"), int(port)
