"""One connection of the lean HTTP/1.1 client (`upstream_pool.HttpPool`, which
says why we have our own): the httptools protocol, the response it gives, and
the request's head and body on their way out."""
from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, AsyncIterator, Sequence
from urllib.parse import urlsplit

import httptools

if TYPE_CHECKING:
    from gateway.http.upstream_pool import HttpPool

__all__ = ["BodyLengthError", "Connection", "Server", "UpstreamError", "UpstreamResponse", "UpstreamTimeout",
           "await_head", "declared_body", "declared_length", "encode_head", "send_body", "upload_done"]

# Reading from the upstream pauses while this much body waits for the tunnel.
HIGH_WATER = 256 * 1024
LOW_WATER = HIGH_WATER // 4
# A body of a declared length up to this, sent after its head, is waited for before the head
# goes on (`UpstreamResponse.body_follows`), for at most BODY_WAIT seconds: an upstream that
# writes both at once sends them a moment apart; one that computes its body after its head
# must not have the head held back (the originator's head timeout would end the request).
SMALL_BODY = 64 * 1024
BODY_WAIT = 0.02


class UpstreamError(Exception):
    """The upstream could not be reached, went silent, or broke the exchange."""


class UpstreamTimeout(UpstreamError):
    """No response head within the head timeout after the request was sent."""


class BodyLengthError(UpstreamError):
    """The request body the peer sent did not match its Content-Length: the peer's
    fault, not the upstream's; the connection is closed, never pooled."""


class Server:
    __slots__ = ("key", "host", "port", "tls", "host_header")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) server address: {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.key = url
        default = 443 if self.tls else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = name if self.port == default else f"{name}:{self.port}"


class Connection(asyncio.Protocol):
    """One upstream connection; one request at a time; parser callbacks fill it."""

    def __init__(self, pool: "HttpPool", server: Server) -> None:
        self.pool = pool
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.head: asyncio.Future[int] = self.loop.create_future()
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.until_close = False
        self.head_only = False
        self.interim = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.writable: asyncio.Future[None] | None = None
        self.paused = False
        self.activity = 0
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.activity += 1
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.complete, self.keep_alive = True, False  # nothing after a 101 is HTTP
            self._wake()
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError(f"invalid response from {self.server.key}: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if not self.complete:
            if exc is None and self.head.done() and self.until_close:
                self.complete = True  # a body delimited by the end of the connection
                self._wake()
            else:
                self.fail(UpstreamError(f"{self.server.key} closed the connection"
                                        + (f": {exc}" if exc else "")))
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    # -- httptools callbacks ---------------------------------------------------
    def on_message_begin(self) -> None:
        self.reason = b""
        self.headers = []

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim = True  # 100 Continue and friends: the real head follows
            return
        self.keep_alive = self.parser.should_keep_alive() and not self.head_only
        framed = any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.headers)
        self.until_close = not framed and status not in (204, 304) and not self.head_only
        if self.head_only or status in (204, 304):
            self.complete = True  # no body, whatever the length header says
        if not self.head.done():
            self.head.set_result(status)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self._wake()

    # -- state -------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: the request may be gone already
        self._wake()
        self.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def expire_head(self, timeout: float) -> None:
        if not self.head.done():
            self.fail(UpstreamTimeout(f"{self.server.key}: no response head within {timeout:g}s"))

    def watch(self, timeout: float) -> None:
        """Fail after `timeout` seconds without a byte from the upstream (while we read)."""
        self.timer = self.loop.call_later(timeout, self._check_silence, timeout, self.activity)

    def _check_silence(self, timeout: float, seen: int) -> None:
        if self.closed or self.complete:
            return
        if self.activity == seen and not self.paused:
            self.fail(UpstreamError(f"{self.server.key}: nothing received for {timeout:g}s"))
        else:
            self.watch(timeout)

    async def drain(self) -> None:
        if self.writable is not None:
            await self.writable
        if self.closed:
            raise UpstreamError(f"{self.server.key} closed the connection")


class UpstreamResponse:
    """The head of an upstream's answer; its body is read with `read()`; `release()` always."""

    __slots__ = ("status", "reason", "raw_headers", "_conn", "_upload")

    def __init__(self, conn: Connection, status: int, upload: asyncio.Task[None] | None) -> None:
        self.status = status
        self.reason = conn.reason.decode("latin-1")
        self.raw_headers = conn.headers
        self._conn = conn
        self._upload = upload

    @property
    def body_follows(self) -> bool:
        """No byte of the body has come yet and it is small, of a declared length: an upstream
        that writes its head and then its body (a streamed answer, aiohttp's StreamResponse).
        Worth waiting for (`wait_body`): head and body then go on together, in one tunnel
        message, and the entry answers them in one write."""
        conn = self._conn
        if conn.chunks or conn.complete or conn.error is not None:
            return False
        for name, value in self.raw_headers:
            if name.lower() == b"content-length":
                value = value.strip()
                return value.isdigit() and int(value) <= SMALL_BODY
        return False

    async def wait_body(self, limit: float) -> None:
        """Until the body's first bytes, its end or an error have come (none taken), or
        `limit` seconds have passed."""
        conn = self._conn
        expired: list[bool] = []  # set by the timer: not the clock, a timer may fire a little early

        def expire() -> None:
            expired.append(True)
            conn._wake()

        timer = conn.loop.call_later(limit, expire)
        try:
            while not conn.chunks and not conn.complete and conn.error is None and not expired:
                conn.waiter = conn.loop.create_future()
                await conn.waiter
                conn.waiter = None
        finally:
            timer.cancel()

    async def read(self) -> bytes | None:
        """The next body chunk; None at the end; UpstreamError when the upstream broke."""
        conn = self._conn
        while not conn.chunks:
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                return None
            conn.waiter = conn.loop.create_future()
            await conn.waiter
            conn.waiter = None
        chunk = conn.chunks.popleft()
        conn.buffered -= len(chunk)
        if conn.paused and conn.buffered < LOW_WATER and conn.transport is not None:
            conn.paused = False
            conn.transport.resume_reading()
        return chunk

    @property
    def at_end(self) -> bool:
        """The whole body has been read: the next `read()` returns None."""
        conn = self._conn
        return conn.complete and not conn.chunks and conn.error is None

    def release(self) -> None:
        """Back to the pool when the exchange ended cleanly; otherwise the connection is closed,
        which is how the upstream learns that a request was abandoned."""
        conn = self._conn
        upload = self._upload
        if upload is not None and not upload.done():
            upload.cancel()
            conn.close()
        reusable = (conn.complete and conn.keep_alive and not conn.chunks and conn.error is None
                    and (upload is None or (upload.done() and not upload.cancelled() and upload.exception() is None)))
        if reusable:
            self._conn.pool._put(conn)
        else:
            conn.close()


def encode_head(method: str, path: str, headers: Sequence[tuple[str, str]], server: Server,
                 chunked: bool) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    has_host = False
    for name, value in headers:
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name or ":" in name:
            raise ValueError(f"invalid header {name!r}")
        has_host = has_host or name.lower() == "host"
        lines.append(f"{name}: {value}")
    if not has_host:
        lines.append(f"Host: {server.host_header}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    lines.append("\r\n")
    head = "\r\n".join(lines)
    try:
        return head.encode("latin-1")
    except UnicodeEncodeError:
        return head.encode("utf-8")


def declared_length(headers: Sequence[tuple[str, str]]) -> int | None:
    """The Content-Length `headers` declare (the first; the request head check leaves one), or None."""
    for name, value in headers:
        if name.lower() == "content-length":
            return int(value)
    return None


async def declared_body(chunks: AsyncIterator[bytes], length: int) -> AsyncIterator[bytes]:
    """`chunks`, sent with a Content-Length of `length`, cut there. A byte past it would
    be read by the upstream as the start of a second request on this keep-alive
    connection, a body short of it would take the next request for its rest: either
    way BodyLengthError, which fails the upload, so the connection is closed
    (`upload_done`) and never pooled (`UpstreamResponse.release`)."""
    left = length
    async for chunk in chunks:
        if len(chunk) > left:
            if left:
                yield chunk[:left]  # the declared request is whole; nothing after it
            raise BodyLengthError(f"the request body runs past its Content-Length {length}")
        left -= len(chunk)
        yield chunk
    if left:
        raise BodyLengthError(f"the request body ended {left} bytes short of its Content-Length {length}")


async def send_body(conn: Connection, body: AsyncIterator[bytes], chunked: bool) -> None:
    transport = conn.transport
    assert transport is not None
    async for chunk in body:
        if conn.closed:
            raise UpstreamError(f"{conn.server.key} closed the connection during the upload")
        if chunk:
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            conn.activity += 1  # a long upload is not silence
            await conn.drain()
    if chunked and not conn.closed:
        transport.write(b"0\r\n\r\n")


async def await_head(conn: Connection, upload: asyncio.Task[None] | None, head_timeout: float | None) -> int:
    if head_timeout is None:
        return await conn.head
    if upload is None:
        # Every bodiless request comes here: a timer, not asyncio.wait.
        timer = conn.loop.call_later(head_timeout, conn.expire_head, head_timeout)
        try:
            return await conn.head
        finally:
            timer.cancel()
    # The head's timeout starts when the upload ends, so a big upload is not a
    # slow upstream; while it goes on, a whole timeout without progress ends it.
    seen = -1
    while upload is not None and not upload.done() and not conn.head.done():
        if conn.activity == seen:
            raise UpstreamTimeout(f"{conn.server.key}: request body stalled for {head_timeout:g}s")
        seen = conn.activity
        await asyncio.wait([conn.head, upload], timeout=head_timeout, return_when=asyncio.FIRST_COMPLETED)
    if not conn.head.done():
        await asyncio.wait([conn.head], timeout=head_timeout)
    if not conn.head.done():
        raise UpstreamTimeout(f"{conn.server.key}: no response head within {head_timeout:g}s")
    return conn.head.result()


def upload_done(conn: Connection):
    def done(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # The request body broke (the caller went away, or the upstream): the
            # upstream must not take a truncated body for a whole one.
            conn.fail(exc if isinstance(exc, UpstreamError) else UpstreamError(f"request body failed: {exc}"))
    return done
