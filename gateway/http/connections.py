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

The hooks use aiohttp's RequestHandler internals (`_request_in_progress`,
`_messages`, `_request_count`, `_keepalive_handle`), checked by
tests/test_slowloris.py.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["EntryLimits", "BoundedServer"]

REFUSED = "max_connections"
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
        super().__init__(handler, keepalive_timeout=limits.keepalive_timeout, **kwargs)
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
    __slots__ = ("_server", "_head_timer", "_head_bytes", "_counted", "_last_body")

    def __init__(self, server: BoundedServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._server = server
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = False   # a byte of the awaited head arrived
        self._counted = False
        self._last_body: Any = None  # the last request's body: its unread rest (aiohttp lingers) is no head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        if server.open >= server.limits.max_connections:
            # Refused before aiohttp sees it: nothing is read, no task started.
            self._manager = None  # so connection_lost has nothing to undo
            self._force_close = True
            transport.close()
            server.drop(REFUSED)
            return
        server.open += 1
        self._counted = True
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._server.open -= 1
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        if data and not self._request_in_progress and (self._last_body is None or self._last_body.is_eof()):
            self._head_bytes = True
            if self._head_timer is None:  # the first byte after a response
                self._arm()
            if self._keepalive_handle is not None:  # no longer idle: header_timeout rules now
                self._keepalive_handle.cancel()
                self._keepalive_handle = None
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # a whole head arrived
            self._disarm()

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        self._last_body = request.content
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            # The next head's time starts at its first byte (idle until then: keepalive_timeout).
            self._disarm()

    def _arm(self) -> None:
        self._head_timer = self._loop.call_later(self._server.limits.header_timeout, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_bytes = False

    def _head_timeout(self) -> None:
        self._head_timer = None
        transport = self.transport
        if self._force_close or transport is None or self._request_in_progress or self._messages:
            return  # closing already, or a request is being served or waits its turn
        if self._head_bytes:
            transport.write(_408)
        self._server.drop(HEADER_TIMEOUT)
        self.force_close()
