"""One connection of the entries' HTTP/1.1 server (`entry_server.py`, which
says what it is for): httptools parses; each request runs its handler in a
task of its own, one at a time (pipelined heads wait their turn); a whole
answer leaves in one write (`entry_response.py`), a streamed one through
aiohttp's StreamResponse and writer; an upgrade is handed to aiohttp."""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING

import httptools
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.tcp_helpers import tcp_keepalive

from gateway.http.connections import _408, HEADER_TIMEOUT, LINGER, REFUSED
from gateway.http.entry_head import BadHead, HeadTooLarge, check_field, check_head, head_bytes, version_of
from gateway.http.entry_request import EntryRequest
from gateway.http.entry_response import answer, plain_error

if TYPE_CHECKING:
    from gateway.http.entry_server import EntryServer

__all__ = ["EntryConnection"]

log = logging.getLogger("gateway.http")

MAX_WAITING = 16  # pipelined heads parsed ahead of the one served; then reading pauses
DISCARD_TIME = 10.0  # seconds an answered request's unread body may take to arrive (and be dropped)


class EntryConnection(BaseProtocol):
    """One caller's connection: parses, queues and answers its requests."""

    def __init__(self, server: EntryServer, remote: tuple[str, int] | None) -> None:
        super().__init__(server.loop)
        self.server = server
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.declared = remote
        self.remote: str | None = remote[0] if remote is not None else None
        self.tls = False
        self.counted = False
        self.waiting: collections.deque[EntryRequest] = collections.deque()
        self.serving: asyncio.Task[None] | None = None
        self.reading: EntryRequest | None = None  # the request whose body is arriving
        self.discarding = False  # that body is unread by its answered handler: dropped
        self.done = False  # no more requests: what arrives is read away until the close
        self.in_head = False
        self.url = b""
        self.raw: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.unparsed = 0  # bytes fed since the parser last completed something (a field, a head, body)
        self.head_deadline = 0.0
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None  # the one timer: head, idle, discard or linger
        self.upgrade: list[bytes] | None = None  # an upgrade request's head and body, for aiohttp
        self.refusal: bytes | None = None  # the answer to a malformed request, after those before it
        self.broken: EntryRequest | None = None  # a request whose body the parser refused

    # -- the connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self.server
        upgrades = server.upgrades
        if upgrades.open >= server.limits.max_connections:
            self.done = True
            transport.close()  # before a byte is read
            upgrades.drop(REFUSED)
            return
        upgrades.open += 1
        self.counted = True
        server.connections.add(self)
        super().connection_made(transport)  # TCP_NODELAY, as aiohttp's
        tcp_keepalive(transport)  # and SO_KEEPALIVE
        if self.remote is None:
            peer = transport.get_extra_info("peername")
            self.remote = str(peer[0]) if isinstance(peer, (list, tuple)) else (str(peer) if peer else None)
        self.tls = transport.get_extra_info("sslcontext") is not None
        self.head_deadline = self.loop.time() + server.limits.header_timeout
        self._arm(self.head_deadline)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._forget()
        super().connection_lost(exc)  # wakes a writer waiting to drain
        lost = ConnectionResetError("the caller's connection was lost")
        if self.reading is not None and not self.discarding:
            self.reading.content.set_exception(lost)
        for request in self.waiting:
            request.content.set_exception(lost)
        self.waiting.clear()
        if self.serving is not None:
            self.serving.cancel()  # the handler's task: its record says the caller went away

    def _forget(self) -> None:
        if self.counted:
            self.counted = False
            self.server.upgrades.open -= 1
            self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        self.done = True
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if self.upgrade is not None:  # handed to aiohttp once the requests before it are answered
            self.upgrade.append(data)
            self.pause_reading()
            return
        self.unparsed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            assert self.upgrade is not None
            self.upgrade.append(data[exc.args[0]:])
            self.pause_reading()
            if self.serving is None:
                self._hand_off()
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, HeadTooLarge):
                self._refuse(431, "Request Header Fields Too Large", "headers_too_large",
                             f"request head over {self.server.head_cap} bytes")
            elif isinstance(cause, BadHead):
                self._malformed(f"BadHttpMessage: {cause}")
            else:
                raise
            return
        except httptools.HttpParserError as exc:
            self._malformed(" ".join(f"{type(exc).__name__}: {exc}".split())[:300])
            return
        if self.unparsed > self.server.head_cap:
            # llhttp holds a field's pieces until its end (on_header sees none of them): one
            # that never ends would grow, and be copied again, with every read.
            self._refuse(431, "Request Header Fields Too Large", "headers_too_large",
                         f"a request field over {self.server.head_cap} bytes")
            return
        if self.in_head and not self.head_deadline and self.serving is None and not self.waiting:
            # Part of a head: header_timeout from its first byte.
            self.head_deadline = self.loop.time() + self.server.limits.header_timeout
            self._arm(self.head_deadline)

    # -- the parser's calls -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.url = b""
        self.raw = []
        self.head_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.unparsed = 0
        value = value.rstrip(b" \t")  # llhttp strips the space before a value, not after
        self.raw.append((name, value))
        self._count(len(name) + len(value) + 4)
        check_field(self.raw)

    def _count(self, n: int) -> None:
        self.head_size += n
        if self.head_size > self.server.head_cap:
            raise HeadTooLarge()

    def on_headers_complete(self) -> None:
        self.unparsed = 0
        self.in_head = False
        self.head_deadline = 0.0
        parser = self.parser
        method = parser.get_method().decode("ascii")
        version = version_of(parser.get_http_version())
        if parser.should_upgrade():
            self.upgrade = [head_bytes(method, self.url, version, self.raw)]
            return
        request = EntryRequest(self, method, self.url.decode("utf-8", "surrogateescape"), version,
                               tuple(self.raw), parser.should_keep_alive())
        check_head(version, request.headers)
        if request.body_exists:
            self.reading = request
        self.waiting.append(request)
        if self.serving is None:
            self._next()
        elif len(self.waiting) >= MAX_WAITING:
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        self.unparsed = 0
        if self.upgrade is not None:
            self.upgrade[0] += body
        elif not self.discarding and self.reading is not None:
            self.reading.content.feed_data(body)

    def on_message_complete(self) -> None:
        self.unparsed = 0
        reading = self.reading
        if reading is None:
            return
        self.reading = None
        if self.discarding:
            self.discarding = False
            if self.timer is not None:  # the discard's bound
                self.timer.cancel()
                self.timer = None
            if self.serving is None:
                self._next()
        else:
            reading.content.feed_eof()

    # -- serving -------------------------------------------------------------------------

    def _next(self) -> None:
        """Serve the next request that waits, hand an upgrade on, or go idle."""
        if self.discarding:
            return  # the next head comes after the body being dropped
        if self.waiting:
            request = self.waiting.popleft()
            self.serving = self.loop.create_task(self._serve(request))
            if self._reading_paused and len(self.waiting) < MAX_WAITING // 2 and (
                    self.reading is None or not self.reading.content.is_eof()):
                self.resume_reading()
            return
        self.serving = None
        if self.refusal is not None:
            self.transport.write(self.refusal)  # type: ignore[union-attr]
            self.refusal = None
            self._end(linger=True)
            return
        if self.upgrade is not None:
            self._hand_off()
            return
        now = self.loop.time()
        self.idle_since = now
        if self.in_head:  # a head began while the last request was served: its time starts now
            self.head_deadline = now + self.server.limits.header_timeout
            self._arm(self.head_deadline)
        else:  # a timer already due sooner (the usual: header_timeout from accept) re-arms when it fires
            self._arm(now + self.server.limits.keepalive_timeout)

    async def _serve(self, request: EntryRequest) -> None:
        if request is self.broken:  # refused before its handler began: the refusal is its answer
            self.serving = None
            self._next()
            return
        keep = False
        try:
            try:
                server = self.server
                if server.current is not None:
                    server.current.set(request)
                resp = await server.handler(request)
            except Exception:
                log.exception("unhandled error serving a request", extra={"remote": self.remote})
                if request.started:  # part of an answer is out: a cut connection is all that is left
                    raise ConnectionAbortedError() from None
                resp = web.Response(status=500, body=b'{"error":"internal","message":"internal error"}',
                                    content_type="application/json")
                resp.force_close()
            keep = await answer(self, request, resp, self.server.closing)
        except ConnectionError:  # the caller went away while it was answered
            keep = False
        except Exception:
            log.exception("unhandled error answering a request", extra={"remote": self.remote})
            keep = False
        finally:
            if self.serving is asyncio.current_task(self.loop):  # with the loop: no getpid() (Python 3.11)
                self.serving = None
        if self.transport is None or self.transport.is_closing():
            return
        if not keep or request is self.broken:  # the rest of a broken one cannot be found
            self._end()
            return
        if request.body_exists and not request.content.is_eof() and self.reading is request:
            # Answered before its body arrived: the rest is dropped as it comes, within a bound.
            self.discarding = True
            if self._reading_paused:
                self.resume_reading()
            self._arm(self.loop.time() + DISCARD_TIME, replace=True)
        self._next()

    def _end(self, linger: bool = False) -> None:
        """No more requests on this connection: close it, reading away first, for
        LINGER, what the caller is (or, with `linger`, may be) still sending (a close
        with unread bytes is a RST, which can discard the answer before it is read)."""
        self.waiting.clear()
        if not linger and self.reading is None and not self.in_head:
            self.close()
            return
        self.done = True
        self.reading = None
        if self._reading_paused:
            self.resume_reading()
        transport = self.transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
        self._arm(self.loop.time() + LINGER, replace=True)

    def _malformed(self, detail: str) -> None:
        log.warning("bad request rejected: %s", detail, extra={"remote": self.remote})
        self._refuse(400, "Bad Request", "bad_request", f"malformed request: {detail}")

    def _refuse(self, status: int, reason: str, code: str, message: str) -> None:
        """A request the parser could not take: answered (after those before it) and the connection ends."""
        self.done = True
        self.in_head = False
        self.refusal = plain_error(status, reason, code, message)
        broken = self.reading
        if broken is not None and not self.discarding:  # its body (or trailer) is refused: so is it
            self.broken = broken
            broken.content.set_exception(ValueError(f"malformed request: {message}"))
            if broken in self.waiting:
                self.waiting.remove(broken)
        self.reading = None
        self.discarding = False  # nothing more is parsed: the refusal goes out next
        if self.serving is None:
            self._next()

    def _hand_off(self) -> None:
        """The upgrade request, and all after it, to aiohttp's server."""
        transport = self.transport
        data = b"".join(self.upgrade or ())
        self.upgrade = None
        self.done = True
        self._forget()
        if transport is not None and not transport.is_closing():
            self.server.hand_off(transport, data, self.declared, writing_paused=self._paused,
                                 reading_paused=self._reading_paused)

    def pause_reading(self) -> None:
        """Flow control (a body's reader, pipelined heads): the transport stops reading."""
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[attr-defined]

    def resume_reading(self, resume_parser: bool = True) -> None:
        """(aiohttp's body reader calls it at its low water and at the body's end.)"""
        if self.upgrade is not None or len(self.waiting) >= MAX_WAITING:
            return  # held for another reason: an upgrade to hand on, pipelined heads
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()  # type: ignore[attr-defined]

    # -- the one timer ---------------------------------------------------------------------

    def _arm(self, when: float, replace: bool = False) -> None:
        timer = self.timer
        if timer is not None:
            if not replace and timer.when() <= when:
                return
            timer.cancel()
        self.timer = self.loop.call_at(when, self._tick)

    def _tick(self) -> None:
        """A deadline: the head's, the idle one, a discard's or a linger's."""
        self.timer = None
        if self.transport is None:
            return
        now = self.loop.time()
        if self.serving is not None or self.waiting:
            return  # re-armed when the connection is idle again (a refusal waits its turn too)
        if self.done or self.discarding:
            self.close()  # a linger or a discard ran out
            return
        limits = self.server.limits
        if self.head_deadline:
            if now < self.head_deadline:
                self._arm(self.head_deadline)
                return
            self.server.upgrades.drop(HEADER_TIMEOUT)
            if not self.in_head:
                self.close()  # nothing of a head came
                return
            # The 408, then our FIN, and what the caller still sends is read away
            # for LINGER seconds (see _end).
            self.transport.write(_408)
            self._end(linger=True)
            return
        deadline = self.idle_since + limits.keepalive_timeout
        if now < deadline:
            self._arm(deadline)
        else:
            self.close()
