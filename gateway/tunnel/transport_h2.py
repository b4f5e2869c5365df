"""The client's end of the tunnel over grpclib (pure-Python gRPC on the `h2`
library) instead of grpc.aio: the same one raw-bytes bidi call on the wire
(/tunnel.v1.Tunnel/Connect), read and written on the asyncio loop itself, with
no gRPC core threads in between (`tunnel_library = "grpclib"`; issue 20,
docs/performance.md). The gateway's end stays grpcio (transport.py).

grpclib's connection layer (grpclib.protocol: the h2 state machine, flow
control, the socket) is used as it is; its call layer is not: messages stay
bytes (no codec), the 5-byte gRPC message prefix is read and written here, and
an oversize message is refused from its prefix before it is buffered.

What grpcio's client does that this one does not: keepalive PINGs. A dead
gateway is found by the stream's own heartbeat (gateway/tunnel/stream.py:
three missed intervals close it as heartbeat_timeout). And an HTTP/2 GOAWAY
from the gateway ends the connection at once (h2 sends nothing after one);
the gateway sends the tunnel's own GOAWAY frame first and drains.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from typing import Sequence
from urllib.parse import unquote

from grpclib.client import Handler
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import StreamTerminatedError
from grpclib.protocol import H2Protocol, Stream
from grpclib.utils import Wrapper
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame

from gateway import __version__
from gateway.tunnel.errors import TransportClosed
from gateway.tunnel.transport import METHOD

__all__ = ["CallFailed", "H2Channel", "H2ClientTransport", "client_ssl_context", "h2_transport_closed",
           "STREAM_WINDOW", "CONNECTION_WINDOW", "MAX_FRAME"]

# What this end lets the gateway send before it reads (HTTP/2 flow control), and
# the largest DATA frame it takes (h2's default 16 KiB costs a parse a frame).
# Chosen by measurement against the grpcio gateway (docs/performance.md).
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 8 << 20
MAX_FRAME = 1 << 20

log = logging.getLogger("gateway.tls")


def _data_repr(frame: DataFrame) -> str:
    return f"<{len(frame.data)} bytes>"


# h2 formats every frame it receives for its trace log, logged or not; a DATA
# frame's default repr copies its body and hex-encodes all of it (then keeps 20
# digits): 0.2 ms for a 256 KiB message. Only repr changes.
DataFrame._body_repr = _data_repr
_PREFIX = struct.Struct(">BI")  # compressed flag, length: every gRPC message
_USER_AGENT = f"tunnel-client/{__version__} grpclib"


class CallFailed(ConnectionError):
    """The tunnel call ended with a gRPC status other than OK, or its connection
    was lost: `code` is the status name as grpcio says it (UNAVAILABLE...).
    A ConnectionError, so what catches OSError around a connect catches it."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def h2_transport_closed(exc: BaseException) -> TransportClosed | None:
    """What a failed call means for the stream (as transport.transport_closed for grpcio)."""
    if isinstance(exc, CallFailed):
        if exc.code == "RESOURCE_EXHAUSTED" and "larger than max" in exc.details.lower():
            return TransportClosed("message_too_large", exc.details)
        if exc.code == "UNAVAILABLE":
            return TransportClosed("connection_lost", exc.details)
        return None
    if isinstance(exc, (StreamTerminatedError, OSError)):
        return TransportClosed("connection_lost", str(exc))
    return None


def client_ssl_context(node: str, *, ca: str = "", cert: str = "", key: str = "",
                       insecure: bool = False) -> tuple[ssl.SSLContext, str | None]:
    """The TLS context (ALPN h2) and the name to check the gateway's certificate
    against (None: the host of `node`), as tls.channel_credentials for grpcio.
    Blocking (reads files; `insecure` fetches the certificate): run it off the loop."""
    # Here, not at the top: gateway.tls loads grpc, which only this path needs from it.
    from gateway.tls import _cert_name, _fetch_server_cert
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
    name = None
    if insecure:
        log.warning("--insecure: the gateway's certificate is NOT verified; anyone in the path can read the tunnel")
        pem = _fetch_server_cert(node)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=pem.decode())
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf itself is the trust anchor
        name = _cert_name(pem) or None
        if name is None:
            ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(cert, key or None)
    ctx.set_alpn_protocols(["h2"])
    return ctx, name


def _split(node: str) -> tuple[str, int]:
    host, _, port = node.rpartition(":")
    return host.strip("[]"), int(port)


class _Protocol(H2Protocol):
    """grpclib's HTTP/2 protocol, announcing our largest frame once connected."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if MAX_FRAME != 16384:
            self.connection._connection.update_settings({SettingCodes.MAX_FRAME_SIZE: MAX_FRAME})
            self.connection.flush()


class H2Channel:
    """One HTTP/2 connection to a gateway node (opened by the first call's first write)."""

    def __init__(self, node: str, *, ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 connect_timeout: float = 10.0) -> None:
        self.node = node
        self.host, self.port = _split(node)
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self.timeout = connect_timeout
        self._config = Configuration(http2_connection_window_size=CONNECTION_WINDOW,
                                     http2_stream_window_size=STREAM_WINDOW).__for_client__()
        self._h2_config = H2Configuration(client_side=True, header_encoding="ascii", validate_inbound_headers=False,
                                          validate_outbound_headers=False, normalize_inbound_headers=False,
                                          normalize_outbound_headers=False)
        self.protocol: _Protocol | None = None
        self.scheme = "https" if ssl_context is not None else "http"
        self.authority = node

    async def connect(self) -> _Protocol:
        if self.protocol is None:
            loop = asyncio.get_running_loop()
            _, protocol = await asyncio.wait_for(loop.create_connection(
                lambda: _Protocol(Handler(), self._config, self._h2_config), self.host, self.port, ssl=self._ssl,
                server_hostname=(self._server_hostname or self.host) if self._ssl is not None else None),
                self.timeout)
            self.protocol = protocol
        return self.protocol

    async def close(self) -> None:
        protocol, self.protocol = self.protocol, None
        if protocol is None:
            return
        transport = getattr(protocol.connection, "_transport", None)
        protocol.processor.close("Channel closed")
        if transport is not None:
            transport.abort()  # a dead peer would hold a graceful close until TCP gives up


class _Wakeup(Wrapper):
    """Wakes the reader and writer when the call is cut (grpclib cancels them with
    StreamTerminatedError); not once the gateway ended it in order: grpcio sends
    RST_STREAM(NO_ERROR) right after its trailers, and what they ended is still read."""

    stream: Stream | None = None

    def cancel(self, error: Exception) -> None:
        if self.stream is not None and self.stream.buffer._eof:
            return
        super().cancel(error)


class H2ClientTransport:
    """The stream-stream call, as ClientTransport (transport.py) for grpcio."""

    known_end = staticmethod(h2_transport_closed)

    def __init__(self, channel: H2Channel, max_message: int, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._channel = channel
        self._max = max_message
        self._metadata = tuple(metadata)
        self._wrapper = _Wakeup()
        self._stream: Stream | None = None
        self._h2 = None
        self._headers_read = False

    def peer(self) -> str:
        return self._channel.node

    async def _start(self) -> Stream:
        protocol = await self._channel.connect()
        if protocol.connection.is_closing():  # the gateway hung up at once (a TLS port spoken to in clear)
            raise CallFailed("UNAVAILABLE", "Connection lost")
        stream = protocol.processor.connection.create_stream(wrapper=self._wrapper)
        headers = [(":method", "POST"), (":scheme", self._channel.scheme), (":path", METHOD),
                   (":authority", self._channel.authority), ("te", "trailers"), ("content-type", "application/grpc"),
                   ("user-agent", _USER_AGENT), *self._metadata]
        with self._wrapper:
            # Bounded: until the stream is registered, a lost connection wakes nobody.
            await asyncio.wait_for(stream.send_request(headers, _processor=protocol.processor),
                                   self._channel.timeout)
        self._stream = self._wrapper.stream = stream
        self._h2 = stream._h2_connection
        return stream

    async def write(self, raw: bytes) -> None:
        size = len(raw)
        if size > self._max:
            raise CallFailed("RESOURCE_EXHAUSTED", f"Sent message larger than max ({size} vs. {self._max})")
        stream = self._stream
        try:
            if stream is None:
                stream = await self._start()
            with self._wrapper:
                await self._send(stream, memoryview(_PREFIX.pack(0, size) + raw))
        except StreamTerminatedError as exc:
            raise CallFailed("UNAVAILABLE", str(exc)) from None
        except H2ProtocolError as exc:
            raise CallFailed("INTERNAL", f"HTTP/2: {exc}") from None

    async def _send(self, stream: Stream, data: memoryview) -> None:
        """DATA frames as large as the window and the gateway's frame size allow."""
        h2, conn, sid = self._h2, stream.connection, stream.id
        transport = stream._transport
        pos, last = 0, len(data)
        while pos < last:
            if not conn.write_ready.is_set():
                await conn.write_ready.wait()
            window = h2.local_flow_control_window(sid)
            if window <= 0:
                stream.window_updated.clear()
                await stream.window_updated.wait()
                continue
            n = min(window, h2.max_outbound_frame_size, last - pos)
            h2.send_data(sid, data[pos:pos + n])
            pos += n
            transport.write(h2.data_to_send())
        conn.data_send_process()

    async def read(self) -> bytes | None:
        stream = self._stream
        if stream is None:
            raise CallFailed("UNAVAILABLE", "read before the call started")
        try:
            with self._wrapper:
                if not self._headers_read:
                    await self._check_headers(stream)
                meta = await stream.recv_data(5)
                if not meta:
                    self._end_status(stream.trailers or ())
                    return None
                flag, size = _PREFIX.unpack(meta)
                if flag:
                    raise CallFailed("INTERNAL", "compressed message: the tunnel sends none")
                if size > self._max:
                    raise CallFailed("RESOURCE_EXHAUSTED", f"Received message larger than max ({size} vs. {self._max})")
                return await stream.recv_data(size) if size else b""
        except StreamTerminatedError as exc:
            raise CallFailed("UNAVAILABLE", str(exc)) from None

    async def _check_headers(self, stream: Stream) -> None:
        headers = dict(await stream.recv_headers())
        self._headers_read = True
        if headers.get(":status") != "200":
            raise CallFailed("UNAVAILABLE", f"gateway answered HTTP status {headers.get(':status')}")
        if "grpc-status" in headers:  # trailers only: the call ended before a message
            self._end_status(headers.items())
            raise CallFailed("UNAVAILABLE", "gateway ended the call before a message")

    @staticmethod
    def _end_status(trailers) -> None:
        fields = dict(trailers)
        code = int(fields.get("grpc-status", "0") or 0)
        if code:
            try:
                name = Status(code).name
            except ValueError:
                name = f"STATUS_{code}"
            raise CallFailed(name, unquote(fields.get("grpc-message", "")))

    async def close(self) -> None:
        stream = self._stream
        if stream is not None and stream.closable:
            stream.reset_nowait(ErrorCodes.CANCEL)
