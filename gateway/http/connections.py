"""Every connection to an HTTP entry is bounded in time and in count
(slowloris): aiohttp's low-level server with a request handler (its
per-connection protocol) that adds what aiohttp lacks.

* `header_timeout`: from accept, and from the first byte after a response,
  a connection has this long to send a whole request head. Then it gets 408
  (when it sent part of a head) or is closed (when it sent nothing), and it
  is counted. Bodies are not timed here: the route's limits and idle
  timeouts do that.
* `keepalive_timeout`: aiohttp's own, for an idle connection between
  requests; once a byte of the next head arrives, header_timeout rules
  instead. A fresh connection that sends nothing is closed by
  header_timeout (aiohttp alone would wait keepalive_timeout).
* `max_connections`: open connections of this server (one per worker);
  beyond it a new connection is closed at once, before any byte is read,
  and counted.

Both timeouts share aiohttp's one keep-alive timer a connection: aiohttp
arms it at accept and after each response for the nearer of the two, and
`_process_keepalive` decides which ran out or re-arms it for the other. A
head that arrives whole in one read, as most do, costs no timer call. The
hooks use aiohttp's RequestHandler internals (`_request_in_progress`,
`_messages`, `_request_count`, `_waiter`, `_keepalive`, `_keepalive_handle`,
`_keepalive_timeout`, `_next_keepalive_close_time`, `_process_keepalive`),
checked by tests/test_slowloris.py.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["EntryLimits", "BoundedServer"]

REFUSED = "max_connections"
LINGER = 2.0  # seconds a connection answered 408 is read away before it is closed
HEADER_TIMEOUT = "header_timeout"


@dataclass(frozen=True, slots=True)
class EntryLimits:
    header_timeout: float = 15.0
    keepalive_timeout: float = 75.0
    max_connections: int = 10000

    @classmethod
    def of(cls, config: Any) -> "EntryLimits":
        """The limits of a gateway or client config (the same three settings)."""
        return cls(config.header_timeout, config.keepalive_timeout, config.max_connections)


class BoundedServer(web.Server):
    """web.Server whose connections are bounded by `limits`; `dropped` counts
    the connections it closed by reason, and `on_drop(reason)` (a metric) is
    called for each."""

    def __init__(self, handler: Any, *, limits: EntryLimits, on_drop: Callable[[str], None] | None = None,
                 **kwargs: Any) -> None:
        # aiohttp's keep-alive timer fires at the nearer of the two; _BoundedHandler decides.
        super().__init__(handler, keepalive_timeout=min(limits.header_timeout, limits.keepalive_timeout), **kwargs)
        self.limits = limits
        self.on_drop = on_drop
        self.open = 0
        self.dropped = {REFUSED: 0, HEADER_TIMEOUT: 0}

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        if self.on_drop is not None:
            self.on_drop(reason)

    def __call__(self) -> RequestHandler:
        return _BoundedHandler(self, loop=self._loop, **self._kwargs)


_408_BODY = b'{"error":"header_timeout","message":"no whole request head within header_timeout"}'
_408 = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(_408_BODY), _408_BODY))


class _BoundedHandler(RequestHandler):
    # Set by connection_made, which comes first (no __init__ of its own: that
    # would cost every connection a frame and a copy of aiohttp's kwargs).
    __slots__ = ("_server", "_head_deadline", "_head_bytes", "_counted", "_last_body")
    _server: BoundedServer
    _head_deadline: float  # loop time by which the awaited head must be whole; 0: none awaited
    _head_bytes: bool      # a byte of the awaited head arrived
    _counted: bool
    _last_body: Any        # the last head's body: its unread rest (aiohttp lingers) is no head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server = self._manager  # type: ignore[assignment]  # the BoundedServer that made it
        self._counted = False
        if server.open >= server.limits.max_connections:
            # Refused before aiohttp sees it: nothing is read, no task started.
            self._manager = None  # so connection_lost has nothing to undo
            self._force_close = True
            transport.close()
            server.drop(REFUSED)
            return
        server.open += 1
        self._counted = True
        self._head_bytes = False
        self._last_body = None
        super().connection_made(transport)  # arms the timer
        self._head_deadline = self._loop.time() + server.limits.header_timeout

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._server.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        awaited = data and not self._request_in_progress and (self._last_body is None or self._last_body.is_eof())
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # a whole head arrived
            self._head_deadline = 0.0
            self._head_bytes = False
            self._last_body = self._messages[-1][1]
        elif awaited:  # part of a head
            self._head_bytes = True
            if not self._head_deadline:  # the first byte after a response: header_timeout from now
                # The timer, armed at the response for at most header_timeout, fires before then.
                self._head_deadline = self._loop.time() + self._server.limits.header_timeout

    def _process_keepalive(self) -> None:
        """The timer's call: the head's time or, between requests, the idle
        time (keepalive_timeout from the last response) ran out, or not yet."""
        self._keepalive_handle = None
        if self._force_close or not self._keepalive or self.transport is None:
            return
        if self._request_in_progress or self._messages:
            self._head_deadline = 0.0  # a request is served or waits its turn: aiohttp re-arms after it
            return
        loop = self._loop
        deadline = self._head_deadline
        idle = not deadline
        if idle:  # aiohttp set the close time for the nearer timeout; idle is keepalive_timeout
            deadline = self._next_keepalive_close_time - self._keepalive_timeout + self._server.limits.keepalive_timeout
        if loop.time() < deadline:
            self._keepalive_handle = loop.call_at(deadline, self._process_keepalive)
        elif idle:
            if self._waiter is not None and not self._waiter.done():  # as aiohttp: not while it lingers
                self.force_close()
        else:
            self._head_deadline = 0.0
            self._server.drop(HEADER_TIMEOUT)
            if not self._head_bytes:
                self.force_close()
                return
            # A lingering close: the 408, then our FIN; what the caller still sends
            # is read away (data_received drops it) for LINGER seconds. Closing at
            # once would answer those bytes with a RST, which can discard the 408
            # on the caller's side before it reads it.
            self.transport.write(_408)
            self._force_close = True
            if self.transport.can_write_eof():  # TLS cannot half-close: it closes after the linger
                self.transport.write_eof()
            self._keepalive_handle = loop.call_later(LINGER, self.force_close)
