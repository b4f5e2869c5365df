"""The entries' HTTP/1.1 server: the gateway's public HTTP entry and the
client's local entry. httptools parses; each request runs its handler in a
task of its own, one at a time a connection (pipelined heads wait their
turn); a whole answer leaves in one write (`entry_response.py`), a streamed
one through aiohttp's StreamResponse. aiohttp's server did the same at about
four times the CPU a request (docs/performance.md).

A connection that asks for an upgrade (a WebSocket, CONNECT) is handed,
head and all, to aiohttp's server (`upgrades`, a `BoundedServer`), which
serves it from then on as it served every connection before.

The limits are `connections.py`'s, kept the same way:
* `header_timeout`: from accept, and from the first byte of a head, a head
  must be whole within it, else 408 (part of a head came) or a close
  (nothing came), counted;
* `keepalive_timeout`: an idle connection between requests is closed;
* `max_connections`: beyond it a new connection is closed at once, counted
  (one count with the upgraded connections aiohttp serves).
"""
from __future__ import annotations

import asyncio
import contextvars
import socket
import ssl
from typing import Any, Awaitable, Callable

from aiohttp import web

from gateway.http.connections import BoundedServer, EntryLimits
from gateway.http.entry_connection import EntryConnection
from gateway.http.entry_request import EntryRequest

__all__ = ["EntryServer"]

Handler = Callable[[EntryRequest], Awaitable[web.StreamResponse]]


def _setting(current: contextvars.ContextVar[Any], handler: Handler) -> Handler:
    """`handler`, setting `current` to its request first (for aiohttp's server)."""

    async def handle(request: Any) -> web.StreamResponse:
        current.set(request)
        return await handler(request)

    return handle


class EntryServer:
    """Serves `handler` with `limits` on the ports it listens on."""

    def __init__(self, handler: Handler, *, limits: EntryLimits, max_header_bytes: int,
                 on_drop: Callable[[str], None] | None = None,
                 current: contextvars.ContextVar[Any] | None = None) -> None:
        self.handler = handler
        # Set to each request in its own task before its handler runs (the request an
        # entry's access record reads), here rather than in a wrapper: one frame less.
        self.current = current
        self.limits = limits
        # A head over this is refused (431) before a handler sees it; under it, the
        # handler's own check answers (a JSON 431 with the request's ids).
        self.head_cap = max(65536, 4 * max_header_bytes)
        # aiohttp's limits for the upgrades it serves, above ours as before, so that an
        # oversize head reaches the handler and gets our 431.
        field = max(8190, max_header_bytes * 2)
        # aiohttp's server for the connections that upgrade; its `open` and `dropped` count ours too.
        self.upgrades = BoundedServer(_setting(current, handler) if current is not None else handler,
                                      limits=limits, on_drop=on_drop, handler_cancellation=True,
                                      access_log=None, max_line_size=field, max_field_size=field)
        self.loop = asyncio.get_running_loop()
        self.connections: set[EntryConnection] = set()
        self.listening: list[asyncio.AbstractServer] = []
        self.closing = False

    def connection(self, remote: tuple[str, int] | None = None) -> EntryConnection:
        """A protocol for a new connection (`remote`: the caller a PROXY header declared)."""
        return EntryConnection(self, remote)

    async def listen(self, host: str | None, port: int, *, ssl_context: ssl.SSLContext | None = None,
                     handshake_timeout: float | None = None, reuse_port: bool = False, backlog: int = 1024) -> None:
        """Listen on `host`:`port`; with TLS the handshake is bounded by `handshake_timeout`
        (our limits start once a connection is made, which with TLS is after it)."""
        tls = {"ssl": ssl_context, "ssl_handshake_timeout": handshake_timeout} if ssl_context is not None else {}
        self.listening.append(await self.loop.create_server(
            self.connection, host, port, reuse_address=True, reuse_port=reuse_port, backlog=backlog, **tls))

    async def accept(self, sock: socket.socket, source: tuple[str, int] | None, *,
                     ssl_context: ssl.SSLContext | None = None, handshake_timeout: float | None = None) -> None:
        """Serve a connection accepted elsewhere (its PROXY header read: `source` is the caller it declared)."""
        tls = {"ssl": ssl_context, "ssl_handshake_timeout": handshake_timeout} if ssl_context is not None else {}
        await self.loop.connect_accepted_socket(lambda: self.connection(source), sock, **tls)

    def hand_off(self, transport: asyncio.Transport, data: bytes, declared: tuple[str, int] | None, *,
                 writing_paused: bool, reading_paused: bool) -> None:
        """A connection whose next request asks for an upgrade, to aiohttp's server, from
        that request's head (`data`) on; `declared`: the caller a PROXY header named."""
        protocol = self.upgrades()
        if declared is not None:
            protocol._cache["peername"] = declared  # aiohttp's request.remote reads it
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if writing_paused:  # the transport will call the new protocol's resume_writing
            protocol.pause_writing()
        if reading_paused:
            transport.resume_reading()
        if data and protocol.transport is not None:
            protocol.data_received(data)

    @property
    def port(self) -> int:
        """The port of the first listening socket (for a server bound to port 0)."""
        return self.listening[0].sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop accepting; the connections go on."""
        for server in self.listening:
            server.close()

    async def shutdown(self, timeout: float = 60.0) -> None:
        """Idle connections close now, those serving a request get `timeout` to finish
        (then they close, their handlers cancelled); with aiohttp's upgraded ones the same."""
        self.close()
        self.closing = True
        serving = []
        for conn in list(self.connections):
            if conn.serving is None:
                conn.close()
            else:
                serving.append(conn.serving)
        upgraded = self.loop.create_task(self.upgrades.shutdown(timeout))  # at the same time
        if serving:
            await asyncio.wait(serving, timeout=timeout)
        for conn in list(self.connections):  # what did not finish in time
            if conn.serving is not None:
                conn.serving.cancel()
            if conn.transport is not None:
                conn.transport.abort()  # a caller that reads nothing must not hold it open
        await upgraded
