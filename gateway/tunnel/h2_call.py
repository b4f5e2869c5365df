"""The client's end of the tunnel on our own HTTP/2 framing (h2_connection.py):
the same one gRPC bidi call on the wire as grpc.aio's (/tunnel.v1.Tunnel/Connect,
raw-bytes messages), read and written on the asyncio loop itself, with no gRPC
core threads in between (`tunnel_library = "builtin"`, the default; issue 20,
docs/performance.md). A grpcio gateway takes it, and a grpcio client still
connects to our gateway.

One connection carries one call, on stream 1. Keepalive PINGs as grpcio's client
sends them (every CLIENT_KEEPALIVE_MS; a gateway that does not answer within
half of that more is gone).
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Sequence
from urllib.parse import unquote

from gateway import __version__
from gateway.tunnel.errors import TransportClosed
from gateway.tunnel.h2_connection import H2Connection
from gateway.tunnel.h2_frames import (CANCEL, DATA, DEFAULT_WINDOW, END_HEADERS, END_STREAM, HEADERS, STATUS_NAMES,
                                      CallFailed, H2Stream, frame)
from gateway.tunnel.pieces import Pieces
from gateway.tunnel.transport import CLIENT_KEEPALIVE_MS, METHOD

__all__ = ["CallFailed", "H2Channel", "H2ClientConnection", "H2ClientTransport", "h2_transport_closed"]

CALL = 1  # the call's stream id: one call a connection
_USER_AGENT = f"tunnel-client/{__version__}"


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


def grpc_status(fields: dict[str, str]) -> CallFailed | None:
    """The error a call's trailers (or trailers-only headers) end it with; None for OK."""
    code = fields.get("grpc-status")
    if code is None:
        return CallFailed("UNKNOWN", "the call ended without a status")
    if code == "0":
        return None
    name = STATUS_NAMES[int(code)] if code.isdecimal() and int(code) < len(STATUS_NAMES) else f"STATUS_{code[:10]}"
    return CallFailed(name, unquote(fields.get("grpc-message", "")))


class H2ClientConnection(H2Connection):
    """A connection to a gateway node carrying the call on stream 1."""

    is_client = True

    def __init__(self, max_message: int) -> None:
        super().__init__(max_message, CLIENT_KEEPALIVE_MS / 1000, max(1.0, CLIENT_KEEPALIVE_MS / 2000))
        self.call = H2Stream(CALL, DEFAULT_WINDOW)
        self.streams[CALL] = self.call

    def on_headers(self, sid: int, fields: dict[str, str], end_stream: bool) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.error is not None or stream.remote_done:
            return
        if stream.headers is None:
            stream.headers = fields
            if fields.get(":status") != "200":
                raise CallFailed("UNAVAILABLE", f"the gateway answered HTTP status {fields.get(':status')}")
            if end_stream or "grpc-status" in fields:  # trailers only: the call ended before a message
                self._end(stream, fields)
        elif end_stream:
            self._end(stream, fields)
        else:
            raise CallFailed("INTERNAL", "HTTP/2 PROTOCOL_ERROR: trailers without END_STREAM")

    def on_end_stream(self, stream: H2Stream) -> None:
        # END_STREAM on DATA: the gateway ended the call with no trailers, so with no status.
        raise CallFailed("UNKNOWN", "the call ended without a status")

    def _end(self, stream: H2Stream, trailers: dict[str, str]) -> None:
        """The gateway's trailers ended the call: with OK, `read` returns what is queued and then None."""
        if stream.missing or stream.head:
            raise CallFailed("INTERNAL", "the call ended inside a message")
        error = grpc_status(trailers)
        if error is not None:
            raise error
        stream.remote_done = True
        stream.wake()


class H2Channel:
    """One HTTP/2 connection to a gateway node, opened by the call's first write."""

    def __init__(self, node: str, *, max_message: int, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, connect_timeout: float = 10.0) -> None:
        self.node = node
        self.max_message = max_message
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self.timeout = connect_timeout
        self.connection: H2ClientConnection | None = None

    async def connect(self) -> H2ClientConnection:
        """Connect and start the call (its HEADERS go out right after the connection's preface)."""
        host, _, port = self.node.rpartition(":")
        host = host.strip("[]")
        loop = asyncio.get_running_loop()
        tls = self._ssl is not None
        transport, conn = await asyncio.wait_for(loop.create_connection(
            lambda: H2ClientConnection(self.max_message), host, int(port), ssl=self._ssl,
            server_hostname=(self._server_hostname or host) if tls else None), self.timeout)
        self.connection = conn
        if not conn.is_open():  # the gateway hung up at once (say, a TLS port spoken to in clear)
            raise conn.closed if isinstance(conn.closed, CallFailed) else CallFailed("UNAVAILABLE", "Connection lost")
        if tls and transport.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
            conn.fail(CallFailed("UNAVAILABLE", "the gateway did not agree to HTTP/2 (ALPN)"))
        else:
            conn.call.headers_sent = True
            conn.transport.write(frame(HEADERS, END_HEADERS, CALL, conn.encoder.encode([
                (":method", "POST"), (":scheme", "https" if tls else "http"), (":path", METHOD),
                (":authority", self.node), ("te", "trailers"), ("content-type", "application/grpc"),
                ("user-agent", _USER_AGENT)])))
        return conn

    async def close(self) -> None:
        """End the call in order (the gateway reads its end, as from a grpcio client's
        channel), then the connection, once what is written went out."""
        conn, self.connection = self.connection, None
        if conn is None:
            return
        call = conn.call
        if conn.is_open() and call.headers_sent and not (call.remote_done or call.reset or call.error):
            conn.transport.write(frame(DATA, END_STREAM, CALL, b""))
        conn.fail(CallFailed("CANCELLED", "the channel was closed"), in_order=True)


class H2ClientTransport:
    """The call, as ClientTransport (transport.py) for grpcio: `write` and `read` raw messages."""

    known_end = staticmethod(h2_transport_closed)

    def __init__(self, channel: H2Channel) -> None:
        self._channel = channel
        self._conn: H2ClientConnection | None = None

    def peer(self) -> str:
        return self._channel.node

    async def write(self, raw: bytes) -> None:
        await self.write_parts((raw,), len(raw))

    async def write_parts(self, parts: Sequence[bytes | memoryview], size: int) -> None:
        """One message given in parts (TunnelStream's writer: a batch of frames, not joined)."""
        conn = self._conn
        if conn is None:
            conn = self._conn = await self._channel.connect()
        call = conn.call
        if call.remote_done:
            raise CallFailed("UNAVAILABLE", "the gateway has ended the call")
        if size > conn.max_message:
            raise CallFailed("RESOURCE_EXHAUSTED", f"Sent message larger than max ({size} vs. {conn.max_message})")
        await conn.send_parts(call, parts, size)

    def write_now(self, parts: Sequence[bytes | memoryview], size: int) -> bool:
        """`write_parts` when it waits for nothing; False (nothing written) when it would
        (not connected yet, the call ended or an oversize message: `write_parts` says so)."""
        conn = self._conn
        if conn is None or conn.call.remote_done or size > conn.max_message:
            return False
        return conn.send_parts_now(conn.call, parts, size)

    async def read(self) -> bytes | None:
        message = await self.read_batch()
        return message.joined() if type(message) is Pieces else message

    async def read_batch(self) -> bytes | Pieces | None:
        """The next message, a big one maybe in the pieces it arrived in (the stream's reader)."""
        conn = self._conn
        if conn is None:
            raise CallFailed("UNAVAILABLE", "read before the call started")
        return await conn.next_message(conn.call)

    async def close(self) -> None:
        conn = self._conn
        if conn is not None and conn.is_open():
            if not conn.call.remote_done:
                conn.reset(CALL, CANCEL)
            conn.fail(CallFailed("CANCELLED", "the call was cancelled"))
