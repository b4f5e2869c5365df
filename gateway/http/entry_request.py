"""A request as the entries' HTTP/1.1 server (`entry_server.py`) parsed it:
the part of aiohttp's BaseRequest the entries read (method, targets, headers,
the body as aiohttp's StreamReader, the peer), so one handler serves a
request from either server, and aiohttp's StreamResponse can stream an
answer to it (`_payload_writer`, `_prepare_hook`, `keep_alive`, `version`)."""
from __future__ import annotations

from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any

from aiohttp.http_writer import HttpVersion, StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

if TYPE_CHECKING:
    from gateway.http.entry_server import EntryConnection

__all__ = ["EntryRequest", "HTTP10", "HTTP11", "HttpVersion"]

HTTP10 = HttpVersion(1, 0)
HTTP11 = HttpVersion(1, 1)


class EntryRequest:
    """One request on an entry connection; its body, if any, streams into `content`."""

    __slots__ = ("method", "raw_path", "version", "raw_headers", "headers", "content", "body_exists",
                 "content_length", "keep_alive", "_conn", "_writer", "_cookies")

    def __init__(self, conn: "EntryConnection", method: str, raw_path: str, version: HttpVersion,
                 raw_headers: tuple[tuple[bytes, bytes], ...], keep_alive: bool) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.raw_headers = raw_headers
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(
            (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for n, v in raw_headers))
        self.keep_alive = keep_alive
        # Framing as llhttp read it (it refuses a bad or repeated length, and a length beside chunked).
        length = self.headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None
        self.body_exists = bool(self.content_length) or "Transfer-Encoding" in self.headers
        self.content: StreamReader = (StreamReader(conn, 2 ** 16, loop=conn.loop) if self.body_exists
                                      else EMPTY_PAYLOAD)
        self._writer: StreamWriter | None = None
        self._cookies: MultiDictProxy[str] | None = None

    @property
    def host(self) -> str:
        """The Host header; without one (HTTP/1.0), as aiohttp: the address the request came to."""
        host = self.headers.get("Host")
        if host is not None:
            return host
        transport = self._conn.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        if isinstance(sockname, tuple):
            return f"[{sockname[0]}]" if len(sockname) == 4 else str(sockname[0])
        return str(sockname) if sockname else ""

    @property
    def path(self) -> str:
        """The target without its query, as sent (what aiohttp's repr of a response shows)."""
        return self.raw_path.partition("?")[0]

    @property
    def remote(self) -> str | None:
        return self._conn.remote

    @property
    def scheme(self) -> str:
        return "https" if self._conn.tls else "http"

    @property
    def secure(self) -> bool:
        return self._conn.tls

    @property
    def transport(self) -> Any:
        return self._conn.transport

    @property
    def cookies(self) -> MultiDictProxy[str]:
        if self._cookies is None:
            parsed = SimpleCookie()
            try:
                parsed.load(self.headers.get("Cookie", ""))
            except CookieError:  # a malformed Cookie header reads as none, as aiohttp's does
                parsed = SimpleCookie()
            self._cookies = MultiDictProxy(MultiDict((k, m.value) for k, m in parsed.items()))
        return self._cookies

    @property
    def _payload_writer(self) -> StreamWriter:
        # Made only when a response streams or a 100 Continue goes out: a whole
        # response is written by the server in one piece without it.
        if self._writer is None:
            self._writer = StreamWriter(self._conn, self._conn.loop)
        return self._writer

    @property
    def writer(self) -> StreamWriter:
        return self._payload_writer

    @property
    def started(self) -> bool:
        """Part of an answer went out (a streamed head): no other answer can follow it."""
        return self._writer is not None and self._writer.output_size > 0

    async def _prepare_hook(self, _response: Any) -> None:
        """aiohttp's StreamResponse calls this as it starts (an application's signal there; none here)."""
