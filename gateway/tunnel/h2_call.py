"""The client's end of the tunnel on an HTTP/2 framing of our own: the same one
gRPC bidi call on the wire as grpc.aio's (/tunnel.v1.Tunnel/Connect, raw-bytes
messages), read and written on the asyncio loop itself (`tunnel_library =
"builtin"`, the default; issue 20, docs/performance.md). The gateway's end is
grpcio (transport.py), and a grpcio client still connects to it.

One connection carries one call (stream 1), so the framing is small: a frame
header is read with one struct call and a DATA payload sliced out of what the
socket gave; a message goes out as one DATA frame whenever the windows allow,
written with the frame header in front. HPACK (headers at the call's start and
its trailers, once each) is the `hpack` library's.

Flow control: the gateway may send a window's worth ahead; the window is given
back as `read` hands messages on, so a slow reader holds the gateway back
instead of buffering without bound. Keepalive PINGs as grpcio's client sends
them (every CLIENT_KEEPALIVE_MS, a dead gateway found after half of it more).
"""
from __future__ import annotations

import asyncio
import ssl

from gateway.tunnel.errors import TransportClosed
from gateway.tunnel.h2_connection import (FRAME_HEAD, MESSAGE_PREFIX, U32, CALL, DATA, END_HEADERS, HEADERS, RST_STREAM,
                                          CallFailed, H2Connection, frame, request_headers, split_node)

__all__ = ["CallFailed", "H2Channel", "H2ClientTransport", "h2_transport_closed"]


def h2_transport_closed(exc: BaseException) -> TransportClosed | None:
    """What a failed call means for the stream (as transport.transport_closed for grpcio)."""
    if not isinstance(exc, CallFailed):
        return TransportClosed("connection_lost", str(exc)) if isinstance(exc, OSError) else None
    lowered = exc.details.lower()
    if exc.code == "RESOURCE_EXHAUSTED" and "larger than max" in lowered:
        return TransportClosed("message_too_large", exc.details)
    if exc.code == "UNAVAILABLE":
        if "keepalive" in lowered:
            return TransportClosed("heartbeat_timeout", exc.details)
        return TransportClosed("connection_lost", exc.details)
    return None


class H2Channel:
    """One HTTP/2 connection to a gateway node, opened by the call's first write."""

    def __init__(self, node: str, *, max_message: int, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, connect_timeout: float = 10.0) -> None:
        self.node = node
        self.max_message = max_message
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self.timeout = connect_timeout
        self.connection: H2Connection | None = None

    async def connect(self) -> H2Connection:
        """Connect and start the call (its HEADERS go out with the connection's preface)."""
        host, port = split_node(self.node)
        loop = asyncio.get_running_loop()
        tls = self._ssl is not None
        transport, conn = await asyncio.wait_for(loop.create_connection(
            lambda: H2Connection(self.max_message), host, port, ssl=self._ssl,
            server_hostname=(self._server_hostname or host) if tls else None), self.timeout)
        self.connection = conn
        if tls and transport.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
            conn.fail(CallFailed("UNAVAILABLE", "the gateway did not agree to HTTP/2 (ALPN)"))
        else:
            conn.transport.write(frame(HEADERS, END_HEADERS, CALL, request_headers("https" if tls else "http", self.node)))
        return conn

    async def close(self) -> None:
        conn, self.connection = self.connection, None
        if conn is not None:
            conn.fail(CallFailed("CANCELLED", "the channel was closed"))


class H2ClientTransport:
    """The call, as ClientTransport (transport.py) for grpcio: `write` and `read` raw messages."""

    known_end = staticmethod(h2_transport_closed)

    def __init__(self, channel: H2Channel) -> None:
        self._channel = channel
        self._conn: H2Connection | None = None

    def peer(self) -> str:
        return self._channel.node

    async def write(self, raw: bytes) -> None:
        conn = self._conn
        if conn is None:
            conn = self._conn = await self._channel.connect()
        if conn.error is not None:
            raise conn.error
        if conn.ended:
            raise CallFailed("UNAVAILABLE", "the gateway has ended the call")
        size = len(raw)
        if size > conn.max_message:
            raise CallFailed("RESOURCE_EXHAUSTED", f"Sent message larger than max ({size} vs. {conn.max_message})")
        total = size + 5
        if total <= conn.send_window and total <= conn.conn_send_window and total <= conn.peer_max_frame:
            # The usual case: the message as one DATA frame, one write.
            conn.send_window -= total
            conn.conn_send_window -= total
            head = FRAME_HEAD.pack(total << 8 | DATA, 0, CALL) + MESSAGE_PREFIX.pack(0, size)
            if size <= 16384:
                conn.transport.write(head + raw)
            else:
                conn.transport.writelines((head, raw))
        else:
            await self._write_frames(conn, [memoryview(MESSAGE_PREFIX.pack(0, size)), memoryview(raw)], total)
        if conn.paused:
            await self._drain(conn)

    async def _write_frames(self, conn: H2Connection, pieces: list[memoryview], remaining: int) -> None:
        """A message in DATA frames as large as the windows and the gateway's frame size allow."""
        loop = asyncio.get_running_loop()
        while remaining:
            if conn.error is not None:
                raise conn.error
            n = min(conn.send_window, conn.conn_send_window, conn.peer_max_frame, remaining)
            if n <= 0:
                conn.window_opened = loop.create_future()
                await conn.window_opened
                continue
            out: list[bytes | memoryview] = [FRAME_HEAD.pack(n << 8 | DATA, 0, CALL)]
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
            conn.send_window -= n
            conn.conn_send_window -= n
            remaining -= n
            conn.transport.writelines(out)
            if conn.paused:
                await self._drain(conn)

    @staticmethod
    async def _drain(conn: H2Connection) -> None:
        while conn.paused and conn.error is None:
            conn.drained = asyncio.get_running_loop().create_future()
            await conn.drained
        if conn.error is not None:
            raise conn.error

    async def read(self) -> bytes | None:
        conn = self._conn
        if conn is None:
            raise CallFailed("UNAVAILABLE", "read before the call started")
        while True:
            if conn.messages:
                message = conn.messages.popleft()
                conn.queued -= len(message)
                conn.give_back()
                return message
            if conn.error is not None:
                raise conn.error
            if conn.ended:
                return None
            conn.waiter = asyncio.get_running_loop().create_future()
            await conn.waiter

    async def close(self) -> None:
        conn = self._conn
        if conn is not None and not conn.ended:
            conn.transport.write(frame(RST_STREAM, 0, CALL, U32.pack(8)))  # CANCEL
            conn.fail(CallFailed("CANCELLED", "the call was cancelled"))
