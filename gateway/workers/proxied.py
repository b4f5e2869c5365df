"""Listening behind an L4 balancer that speaks the PROXY protocol
(`proxy_protocol = true`): a port whose every connection must start with a
PROXY header, read before anything else touches the connection.

The header is read straight off the socket: peeked, and only its own bytes
taken, so what follows it (a TLS ClientHello, an HTTP head, an HTTP/2
preface) is still in the socket for whatever transport takes it next. That is
how TLS on the HTTP entry works: the socket goes to asyncio with `ssl=` only
after its plaintext PROXY header is gone.

The tunnel port is a grpc server, which cannot be handed a socket: `Relay`
pipes each connection to it on a loopback port and records, by the relay's
local address (what grpc reports as the peer), whom the connection is from.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Awaitable, Callable

from gateway.proxy_protocol import MAX_HEADER, ProxyHeaderError, parse_header

__all__ = ["ProxiedServer", "Relay", "bind_sockets", "read_proxy_header", "grpc_peer"]

log = logging.getLogger("gateway.proxy")

Address = tuple[str, int]
# Called with an accepted socket whose header was read, the declared source (None:
# the peer itself), the peer, and the loop time by which the header's bound ends.
OnConnection = Callable[[socket.socket, "Address | None", Address, float], Awaitable[None]]
ACCEPT_BATCH = 64       # connections accepted in one readable callback of a listening socket
RELAY_HIGH_WATER = 1 << 20  # bytes buffered towards one side before the other is paused
PROXY_HEADER = "proxy_header"  # the drop reason of a connection without a valid header in time
CONNECT_TIMEOUT = 5.0   # seconds to connect to this worker's own grpc server on loopback


async def read_proxy_header(sock: socket.socket, deadline: float) -> Address | None:
    """Read the PROXY header off a non-blocking socket by loop time `deadline`:
    the declared source, or None for LOCAL/UNKNOWN. Raises ProxyHeaderError,
    TimeoutError or OSError."""
    loop = asyncio.get_running_loop()
    got = b""
    while True:
        try:
            chunk = sock.recv(MAX_HEADER - len(got), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await _readable(loop, sock, deadline)
            continue
        if not chunk:
            raise ProxyHeaderError("connection closed before a whole PROXY header")
        parsed = parse_header(got + chunk)
        if parsed is None:
            # All of it is header: taken now, so a slow sender's bytes do not keep
            # the socket readable (a busy loop) while the rest is awaited.
            got += sock.recv(len(chunk))
            continue
        sock.recv(parsed.length - len(got))  # peeked, so all there: the caller's bytes stay
        return parsed.source


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket, deadline: float) -> None:
    ready = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        async with asyncio.timeout_at(deadline):
            await ready
    finally:
        loop.remove_reader(fd)


def bind_sockets(host: str, port: int, backlog: int = 1024) -> list[socket.socket]:
    """Listening sockets on every address of `host`, shared with the other workers (SO_REUSEPORT)."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # as asyncio: "::" must not take the IPv4 port too
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise OSError(exc.errno, f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    return sockets


class ProxiedServer:
    """Listening sockets whose connections start with a PROXY header. Each is
    read (within `timeout` of accept, at most `max_pending` at once) and handed
    to `on_connection`; one without a valid header is closed and logged.
    Quacks as much of asyncio.Server as aiohttp's sites use (close, sockets)."""

    def __init__(self, sockets: list[socket.socket], on_connection: OnConnection, *, timeout: float,
                 max_pending: int, what: str, on_drop: Callable[[str], None] | None = None) -> None:
        self.sockets = sockets
        self.on_connection = on_connection
        self.timeout = timeout
        self.max_pending = max_pending
        self.what = what
        self.on_drop = on_drop  # called with the reason of each connection closed here (a metric)
        self._pending: set[asyncio.Task] = set()
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting; connections whose header is awaited are closed."""
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()
        for task in list(self._pending):
            task.cancel()

    async def wait_closed(self) -> None:
        return None

    def _dropped(self, reason: str) -> None:
        if self.on_drop is not None:
            self.on_drop(reason)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: try again on the next readable
                log.warning("accept failed: %s", exc, extra={"port": self.what})
                return
            conn.setblocking(False)
            if len(self._pending) >= self.max_pending:  # bounded, like an entry's max_connections
                conn.close()
                self._dropped("max_connections")
                continue
            task = self._loop.create_task(self._handshake(conn, peer[:2]))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _handshake(self, conn: socket.socket, peer: Address) -> None:
        deadline = self._loop.time() + self.timeout
        try:
            source = await read_proxy_header(conn, deadline)
        except (ProxyHeaderError, TimeoutError, OSError) as exc:
            _close_read(conn)
            self._dropped(PROXY_HEADER)
            detail = str(exc) or "no whole PROXY header within header_timeout"
            log.info("connection without a valid PROXY header closed: %s", detail,
                     extra={"peer": f"{peer[0]}:{peer[1]}", "port": self.what})
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        try:
            await self.on_connection(conn, source, peer, deadline)
        except (OSError, TimeoutError) as exc:  # e.g. a TLS handshake that failed or ran out of time
            log.info("connection closed: %s", exc or "timed out", extra={"peer": f"{peer[0]}:{peer[1]}",
                                                                           "port": self.what})
        except Exception:
            log.exception("connection failed", extra={"peer": f"{peer[0]}:{peer[1]}", "port": self.what})


def _close_read(conn: socket.socket) -> None:
    """Close after reading away what already arrived (a bounded amount), so the
    peer gets a FIN, not the RST that unread bytes would make."""
    try:
        conn.recv(1 << 16)
    except OSError:
        pass
    conn.close()


def grpc_peer(address: Address) -> str:
    """An address as grpc spells a peer ("ipv4:1.2.3.4:5", "ipv6:[::1]:5")."""
    host, port = address
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


class Relay:
    """`on_connection` of the public tunnel port: pipes each connection to the
    grpc server at `target` (loopback), bytes unchanged (TLS included), and
    keeps whom each pipe is from for `resolve`."""

    def __init__(self, target: Address) -> None:
        self.target = target
        self.peers: dict[Address, str] = {}  # the pipe's local address -> the caller, as a grpc peer

    def resolve(self, peer: str) -> str:
        """The caller behind a grpc peer string (unchanged when it is not a pipe's)."""
        kind, _, rest = peer.partition(":")
        host, _, port = rest.rpartition(":")
        if kind != "ipv4" or not port.isdigit():
            return peer
        return self.peers.get((host, int(port)), peer)

    async def __call__(self, conn: socket.socket, source: Address | None, peer: Address, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        inward, outward = _Pipe(), _Pipe()  # inward: from the caller; outward: from grpc
        inward.other, outward.other = outward, inward
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                transport, _ = await loop.create_connection(lambda: outward, *self.target)
        except BaseException:
            conn.close()
            raise
        local = transport.get_extra_info("sockname")[:2]
        # Recorded before a byte of the caller's reaches grpc, so its servicer finds it.
        self.peers[local] = grpc_peer(source or peer)
        outward.on_lost = lambda: self.peers.pop(local, None)
        try:
            await loop.connect_accepted_socket(lambda: inward, conn)
        except BaseException:
            transport.close()
            conn.close()
            raise


class _Pipe(asyncio.Protocol):
    """One side of a relay: what it reads, the other side writes; when the
    other's buffer is full this side stops reading; when either side ends, both do."""

    __slots__ = ("transport", "other", "early", "lost", "on_lost")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Pipe = self
        self.early: list[bytes] = []  # what the other side read before this one was connected
        self.lost = False
        self.on_lost: Callable[[], object] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=RELAY_HIGH_WATER)  # type: ignore[attr-defined]
        if self.other.lost:
            transport.close()
            return
        if self.early:  # grpc's server preface, sent as soon as the pipe connected to it
            transport.writelines(self.early)  # type: ignore[attr-defined]
            self.early = []

    def data_received(self, data: bytes) -> None:
        other = self.other.transport
        if other is None:
            self.other.early.append(data)  # bounded: the other side is connected next, or this one closes
        else:
            other.write(data)

    def eof_received(self) -> bool:
        return False  # closes this side; connection_lost closes the other

    def pause_writing(self) -> None:
        other = self.other.transport
        if other is not None and not other.is_closing():
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.other.transport
        if other is not None and not other.is_closing():
            other.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        other = self.other.transport
        if other is not None:
            other.close()  # after what is buffered for it is written
        if self.on_lost is not None:
            self.on_lost()
