"""HTTP/2 for the tunnel's gRPC calls: the wire's constants, a frame's bytes, and
one call's stream state (h2_connection.py reads and writes them)."""
from __future__ import annotations

import asyncio
import struct
from collections import deque

from gateway.tunnel.pieces import Pieces, message_of

__all__ = ["CallFailed", "Broken", "H2Stream", "frame", "STREAM_WINDOW", "CONNECTION_WINDOW", "MAX_FRAME",
           "STATUS_NAMES", "PREFACE"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# What the peer may send a stream ahead of its reader (the connection: twice
# that), and the largest DATA frame we take (grpcio frames by the reader's maximum).
STREAM_WINDOW = 8 << 20
CONNECTION_WINDOW = 2 * STREAM_WINDOW
MAX_FRAME = 1 << 20
DEFAULT_WINDOW = 65535
GIVE_BACK = STREAM_WINDOW // 4
PARTIAL_DATA = 65536  # a DATA frame larger than this is read as it arrives, not buffered whole
MAX_HEADER_BLOCK = 64 << 10  # a call's headers or trailers, all their frames together
MAX_OWED = 1000  # control frames answered while the peer reads nothing (PING and SETTINGS floods)
MAX_WINDOW = 0x7FFFFFFF
FRAME_HEAD = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
MESSAGE_PREFIX = struct.Struct(">BI")  # every gRPC message: compressed flag, length
SETTING_PAIR = struct.Struct(">HI")
U32 = struct.Struct(">I")
GOAWAY_HEAD = struct.Struct(">II")
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 1, 2, 3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 4, 5, 6
NO_ERROR, PROTOCOL_ERROR, CANCEL = 0, 1, 8
# HTTP/2 error codes by name (a GOAWAY says which).
ERROR_CODES = {"PROTOCOL_ERROR": 1, "INTERNAL_ERROR": 2, "FLOW_CONTROL_ERROR": 3, "FRAME_SIZE_ERROR": 6,
               "COMPRESSION_ERROR": 9, "ENHANCE_YOUR_CALM": 11}
STATUS_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
                "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
# An RST_STREAM's HTTP/2 error code as the gRPC status grpcio reports for it.
RESET_STATUS = {7: "UNAVAILABLE", 8: "CANCELLED", 11: "RESOURCE_EXHAUSTED", 12: "PERMISSION_DENIED"}


class CallFailed(ConnectionError):
    """A call ended with a gRPC status other than OK, or its connection was
    lost: `code` is the status name as grpcio says it (UNAVAILABLE...). A
    ConnectionError, so what catches OSError around a connect catches it."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class Broken(Exception):
    """A connection error: (HTTP/2 error name, what)."""


def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    return FRAME_HEAD.pack(len(payload) << 8 | kind, flags, sid) + payload


class H2Stream:
    """One call: the messages read off it, and its windows."""

    __slots__ = ("sid", "messages", "queued", "unacked", "partial", "missing", "head", "waiter", "send_window",
                 "headers", "headers_sent", "remote_done", "reset", "error")

    def __init__(self, sid: int, send_window: int) -> None:
        self.sid = sid
        self.messages: deque[bytes | Pieces] = deque()
        self.queued = 0  # bytes of messages not yet read
        self.unacked = 0  # DATA bytes received and not yet given back as window
        # A message spanning frames or reads (its spans: buffer, start, stop), and how much of it is missing.
        self.partial: list[tuple[bytes, int, int]] = []
        self.missing = 0
        self.head = b""  # a message prefix split between frames
        self.waiter: asyncio.Future | None = None
        self.send_window = send_window
        self.headers: dict[str, str] | None = None  # the peer's
        self.headers_sent = False
        self.remote_done = False  # the peer ended its side in order (END_STREAM; the client: trailers with OK)
        self.reset = False  # the peer reset it: nothing more goes out on it
        self.error: BaseException | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.wake()

    def take(self, buf: bytes, start: int, stop: int, max_message: int) -> None:
        """Messages out of DATA bytes buf[start:stop], queued for the reader; raises
        CallFailed for a message this end does not take (compressed, over `max_message`)."""
        while start < stop:
            if self.missing:  # a message begun in an earlier frame or read
                n = min(self.missing, stop - start)
                self.partial.append((buf, start, start + n))
                start += n
                self.missing -= n
                if not self.missing:
                    # A big message stays in its reads' bytes (pieces.py), a small one is joined.
                    self._deliver(message_of(self.partial))
                    self.partial = []
                continue
            if self.head or stop - start < 5:
                n = min(5 - len(self.head), stop - start)
                self.head += buf[start:start + n]
                start += n
                if len(self.head) < 5:
                    continue
                flag, size = MESSAGE_PREFIX.unpack(self.head)
                self.head = b""
            else:
                flag, size = MESSAGE_PREFIX.unpack_from(buf, start)
                start += 5
            if flag:
                raise CallFailed("INTERNAL", "a compressed message: the tunnel sends none")
            if size > max_message:
                raise CallFailed("RESOURCE_EXHAUSTED",
                                 f"Received message larger than max ({size} vs. {max_message})")
            if stop - start >= size:
                self._deliver(buf[start:start + size])
                start += size
            else:
                self.missing = size

    def _deliver(self, message: bytes | Pieces) -> None:
        self.messages.append(message)
        self.queued += len(message)
