"""The gateway's end of the tunnel on our own HTTP/2 framing (h2_connection.py):
the tunnel port as a gRPC server of one method, /tunnel.v1.Tunnel/Connect,
whose calls are served on the worker's event loop with no gRPC core threads in
between (`tunnel_server = "builtin"`, the default; issue 20). Any gRPC client
connects to it: ours (h2_call.py) and a stock grpcio one.

Each call runs `serve(transport)` (the tunnel endpoint's) in a task; when it
returns, the call ends with OK, or with the status `refuse` set. A connection
may carry several calls (a grpcio channel may open more than one); other
methods end at once with UNIMPLEMENTED.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Awaitable, Callable, Sequence

from gateway.tunnel.errors import TransportClosed
from gateway.tunnel.h2_call import h2_transport_closed
from gateway.tunnel.h2_connection import H2Connection
from gateway.tunnel.h2_frames import (END_HEADERS, END_STREAM, HEADERS, MAX_WINDOW, NO_ERROR, PREFACE, STATUS_NAMES,
                                      CallFailed, H2Stream, frame)
from gateway.tunnel.pieces import Pieces
from gateway.tunnel.transport import METHOD, SERVER_KEEPALIVE_PATIENCE

__all__ = ["TunnelServer", "H2ServerTransport", "server_ssl_context"]

log = logging.getLogger("gateway.tunnel")

MAX_CALLS = 4  # calls at once on one connection (a tunnel client opens one)
REFUSAL_WAIT = 1.0
_STOPPING = "this gateway worker is shutting down"
STATUS = {name: code for code, name in enumerate(STATUS_NAMES)}  # gRPC status codes by name
RESPONSE_HEAD = [(":status", "200"), ("content-type", "application/grpc")]


def server_ssl_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """The tunnel port's TLS (ALPN h2); with `client_ca`, clients must show a certificate it signed (mTLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    return ctx


def grpc_peer(address: tuple | None) -> str:
    """A socket address as grpc names a peer ("ipv4:10.0.0.1:5000", "ipv6:[::1]:5000")."""
    if not address:
        return "unknown"
    host, port = address[0], address[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def grpc_message(text: str) -> str:
    """A grpc-message value: UTF-8, percent-encoded outside printable ASCII (and "%" itself)."""
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in text.encode())


def status_of(exc: BaseException) -> int:
    return STATUS.get(exc.code, STATUS["UNKNOWN"]) if isinstance(exc, CallFailed) else STATUS["UNKNOWN"]


def trailers(code: int, details: str, with_head: bool) -> list[tuple[str, str]]:
    """A call's last header block: its status (and, for a call that sent nothing, the response head too)."""
    fields = [("grpc-status", str(code))] + ([("grpc-message", grpc_message(details))] if details else [])
    return [*RESPONSE_HEAD, *fields] if with_head else fields


class H2ServerTransport:
    """The gateway's end of one Connect call, as ServerTransport (transport.py) for grpcio."""

    __slots__ = ("_conn", "_stream", "code", "details", "was_read")

    def __init__(self, conn: "H2ServerConnection", stream: H2Stream) -> None:
        self._conn = conn
        self._stream = stream
        self.code = 0  # the status the call ends with
        self.details = ""
        self.was_read = False  # the servicer asked for a message

    @staticmethod
    def known_end(exc: BaseException) -> TransportClosed | None:
        if isinstance(exc, CallFailed) and exc.code == "CANCELLED":
            return TransportClosed("closed_by_peer", exc.details)  # the client cancelled its call: its choice
        return h2_transport_closed(exc)

    async def read(self) -> bytes | None:
        message = await self.read_batch()
        return message.joined() if type(message) is Pieces else message

    async def read_batch(self) -> bytes | Pieces | None:
        """The next message, a big one maybe in the pieces it arrived in (the stream's reader)."""
        self.was_read = True
        try:
            return await self._conn.next_message(self._stream)
        except CallFailed as exc:
            # The call ends with the status that says why (the peer of an oversize message reads
            # what gRPC's own limit would have told it); the stream closes with the reason.
            self.code, self.details = status_of(exc), exc.details
            known = self.known_end(exc)
            if known is not None:
                raise known from None
            raise
        except TransportClosed as exc:  # the server stops: so does the call, UNAVAILABLE
            self.code, self.details = STATUS["UNAVAILABLE"], exc.detail
            raise

    async def write(self, raw: bytes) -> None:
        await self.write_parts((raw,), len(raw))

    async def write_parts(self, parts: Sequence[bytes | memoryview], size: int) -> None:
        """One message given in parts (TunnelStream's writer: a batch of frames, not joined)."""
        stream = self._stream
        if not stream.headers_sent:
            self._conn.check_open(stream)
            self._conn.respond(stream)
        await self._conn.send_parts(stream, parts, size)

    def write_now(self, parts: Sequence[bytes | memoryview], size: int) -> bool:
        """`write_parts` when it waits for nothing; False (nothing written) when it would."""
        stream = self._stream
        if not stream.headers_sent:
            if stream.error is not None or stream.reset or not self._conn.is_open():
                return False
            self._conn.respond(stream)
        return self._conn.send_parts_now(stream, parts, size)

    def peer(self) -> str:
        return self._conn.peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._conn.auth_context()

    def refuse(self, details: str) -> None:
        """End the call, when the servicer returns, with RESOURCE_EXHAUSTED (admission's refusal)."""
        self.code, self.details = STATUS["RESOURCE_EXHAUSTED"], details

    async def close(self) -> None:
        return None  # the call ends when the servicer returns


class H2ServerConnection(H2Connection):
    """A connection to the tunnel port: its calls, each served in a task."""

    is_client = False

    def __init__(self, server: "TunnelServer", peer: str | None = None) -> None:
        super().__init__(server.max_message, server.keepalive, server.keepalive * SERVER_KEEPALIVE_PATIENCE)
        self.server = server
        self.peer = peer or ""
        self._preface = b""
        self.last_sid = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.peer:
            self.peer = grpc_peer(transport.get_extra_info("peername"))
        if self.transport.get_extra_info("ssl_object") is not None:
            if self.transport.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
                self.fail(CallFailed("UNAVAILABLE", "the client did not agree to HTTP/2 (ALPN)"))
                return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self._preface is not None:
            self._preface += data
            if len(self._preface) < len(PREFACE):
                if not PREFACE.startswith(self._preface):
                    self._not_http2()
                return
            if not self._preface.startswith(PREFACE):
                self._not_http2()
                return
            data, self._preface = self._preface[len(PREFACE):], None
            if not data:
                return
        super().data_received(data)

    def _not_http2(self) -> None:
        log.info("tunnel port: a connection that does not speak HTTP/2 closed", extra={"peer": self.peer})
        self._preface = None
        self.fail(CallFailed("UNAVAILABLE", "not HTTP/2"))

    def auth_context(self) -> dict[str, list[bytes]]:
        """The client certificate's names, as grpc's auth context has them (tls.peer_names reads them)."""
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        if not cert:
            return {}
        names = [value.encode() for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
        sans = [value.encode() for kind, value in cert.get("subjectAltName", ())]
        return {"x509_common_name": names, "x509_subject_alternative_name": sans,
                "transport_security_type": [b"ssl"]}

    def on_headers(self, sid: int, fields: dict[str, str], end_stream: bool) -> None:
        stream = self.streams.get(sid)
        if stream is not None:  # trailers from the client: its side is done
            if end_stream:
                try:
                    self.end_of(stream)
                except CallFailed as exc:
                    self.stream_error(stream, exc)
            return
        if sid % 2 == 0 or sid <= self.last_sid:
            raise CallFailed("INTERNAL", f"HTTP/2 PROTOCOL_ERROR: a client stream id {sid} out of order")
        self.last_sid = sid
        if fields.get(":path") != METHOD:
            self._answer_only(sid, STATUS["UNIMPLEMENTED"], f"Method not found: {fields.get(':path')}", end_stream)
        elif fields.get(":method") != "POST" or not fields.get("content-type", "").startswith("application/grpc"):
            self._answer_only(sid, STATUS["INTERNAL"], "not a gRPC call", end_stream)
        elif len(self.streams) >= MAX_CALLS or self.server.stopping:
            self.reset(sid, 7)  # REFUSED_STREAM: the client may retry elsewhere
        else:
            stream = H2Stream(sid, self.peer_initial_window)
            stream.headers = fields
            stream.remote_done = end_stream
            self.streams[sid] = stream
            task = asyncio.get_running_loop().create_task(self._run(H2ServerTransport(self, stream), stream))
            self.server.tasks.add(task)
            task.add_done_callback(self.server.tasks.discard)

    def on_end_stream(self, stream: H2Stream) -> None:
        stream.remote_done = True
        stream.wake()

    def stream_error(self, stream: H2Stream, error: CallFailed) -> None:
        self.fail_stream(stream, error)  # the servicer's read raises it; the call ends with its status

    def last_seen(self) -> int:
        return self.last_sid

    def _answer_only(self, sid: int, code: int, message: str, end_stream: bool = False) -> None:
        """A call refused before it started: trailers only, and a reset of the client's side."""
        self.write_control(frame(HEADERS, END_HEADERS | END_STREAM, sid,
                                 self.encoder.encode(trailers(code, message, with_head=True))))
        if not end_stream:
            self.reset(sid, NO_ERROR)

    def respond(self, stream: H2Stream) -> None:
        stream.headers_sent = True
        self.send_headers(stream.sid, RESPONSE_HEAD)

    async def _run(self, transport: H2ServerTransport, stream: H2Stream) -> None:
        try:
            await self.server.serve(transport)
        except asyncio.CancelledError:
            transport.code, transport.details = STATUS["UNAVAILABLE"], _STOPPING
            raise
        except (CallFailed, TransportClosed) as exc:  # the call or its connection ended under it
            log.info("tunnel call ended: %s", exc, extra={"peer": self.peer})
        except Exception as exc:  # noqa: BLE001  (the call ends with it; the worker goes on)
            log.exception("tunnel call failed", extra={"peer": self.peer})
            transport.code, transport.details = STATUS["UNKNOWN"], f"Unexpected error: {type(exc).__name__}"
        finally:
            if transport.code and not transport.was_read:
                await self._first_message(stream)
            self._finish(stream, transport.code, transport.details)

    async def _first_message(self, stream: H2Stream) -> None:
        """A call refused before it read anything (admission) waits for the client's first
        message, a second at most: grpcio's client reports a status that comes before its
        first write as INTERNAL, not as the status sent."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.next_message(stream), REFUSAL_WAIT)

    def _finish(self, stream: H2Stream, code: int, details: str) -> None:
        """The call's trailers (or trailers only), and a reset of the client's side if it still sends."""
        self.streams.pop(stream.sid, None)
        if not self.is_open() or stream.reset:
            return  # (a stream the client reset takes no more frames)
        self.send_headers(stream.sid, trailers(code, details, with_head=not stream.headers_sent), True)
        if not stream.remote_done:
            self.reset(stream.sid, NO_ERROR)
        self.fail_stream(stream, CallFailed("CANCELLED", "the call has ended"))


class TunnelServer:
    """The tunnel port of one worker (SO_REUSEPORT with the other workers')."""

    def __init__(self, serve: Callable[[H2ServerTransport], Awaitable[None]], *, max_message: int,
                 keepalive: float, ssl_context: ssl.SSLContext | None = None, handshake_timeout: float = 10.0) -> None:
        self.serve = serve
        self.max_message = max_message
        self.keepalive = keepalive
        self.ssl = ssl_context
        self.handshake_timeout = handshake_timeout
        self.connections: set[H2ServerConnection] = set()
        self.tasks: set[asyncio.Task] = set()  # the calls running
        self.stopping = False
        self._servers: list[asyncio.AbstractServer] = []

    def _tls(self) -> dict:
        return {"ssl": self.ssl, "ssl_handshake_timeout": self.handshake_timeout} if self.ssl is not None else {}

    async def listen(self, host: str, port: int) -> None:
        """Bind and serve (OSError when the port cannot be bound)."""
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(lambda: H2ServerConnection(self), host, port, reuse_port=True,
                                                      backlog=1024, **self._tls()))

    async def serve_accepted(self, conn: socket.socket, source: tuple | None, peer: tuple | None,
                             _deadline: float) -> None:
        """A connection accepted elsewhere (after its PROXY header): `source` is the caller it declared."""
        name = grpc_peer(source or peer)
        await asyncio.get_running_loop().connect_accepted_socket(lambda: H2ServerConnection(self, name), conn,
                                                                 **self._tls())

    async def stop(self, grace: float) -> None:
        """Stop accepting now (and tell every client: GOAWAY, no new calls); calls running
        get `grace` seconds, then their reads raise gateway_stopping; then they are cancelled."""
        self.stopping = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.goaway(NO_ERROR, "server stopping", MAX_WINDOW)
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace)
        for conn in list(self.connections):
            for stream in list(conn.streams.values()):
                conn.fail_stream(stream, TransportClosed("gateway_stopping", _STOPPING))
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=1.0)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=3.0)  # their trailers go out (UNAVAILABLE)
        for conn in list(self.connections):
            conn.goaway(NO_ERROR, "server stopping", conn.last_sid)
            conn.fail(CallFailed("UNAVAILABLE", _STOPPING), in_order=True)
