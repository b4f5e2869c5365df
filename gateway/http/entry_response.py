"""A whole answer on an entry connection, as bytes: what aiohttp's
Response.prepare and write_eof would write for it (the same status line,
Content-Length, Content-Type, Date, Server and Connection rules), built in
one piece so that it leaves in one write. A streamed answer goes through
aiohttp's own StreamResponse and writer instead (`entry_request.py`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from aiohttp import web
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time, should_remove_content_length
from aiohttp.http import SERVER_SOFTWARE

if TYPE_CHECKING:
    from aiohttp.base_protocol import BaseProtocol

    from gateway.http.entry_request import EntryRequest

__all__ = ["answer", "whole_response", "plain_error"]

_SERVER = f"Server: {SERVER_SOFTWARE}"
_FIELD = ": ".join  # of a (name, value) pair
# A body up to this size is joined to its head (one write); a larger one is written after it (no copy).
_JOIN_UNDER = 16384


def whole_response(resp: web.StreamResponse, request: "EntryRequest", closing: bool
                   ) -> tuple[list[bytes | bytearray], bool] | None:
    """The bytes of `resp`, not yet started (its head and body in one piece, or in two
    when the body is large), and whether the connection stays
    open after it; None for one only aiohttp can write (a payload object for
    a body, compression, cookies, chunking asked for, a subclass). Reads
    aiohttp's private fields, the cheapest way at every request: the parity
    with aiohttp's own output is tests/test_entry_server.py's."""
    if resp.__class__ is not web.Response or resp._chunked or resp._compression or resp._cookies:
        return None
    body = resp._body
    if body is not None and body.__class__ is not bytes and not isinstance(body, bytearray):
        return None
    method = request.method
    status = resp._status
    version = request.version
    keep_alive = resp._keep_alive
    if keep_alive is None:
        keep_alive = request.keep_alive
    if closing:
        keep_alive = False
    headers = resp._headers
    size = len(body) if body else 0
    no_length = should_remove_content_length(method, status)  # aiohttp's own rules, so the bytes stay its
    empty = must_be_empty_body(method, status)
    declared = headers.get("Content-Length")
    if (no_length and declared is not None) or (empty and "Transfer-Encoding" in headers):
        drop = {"content-length", "transfer-encoding"} if no_length else {"transfer-encoding"}
        lines = list(map(_FIELD, [(name, value) for name, value in headers.items() if name.lower() not in drop]))
        declared = None
    else:
        lines = list(map(_FIELD, headers.items()))
    fields = "".join(lines)
    if "\r" in fields or "\n" in fields:
        # A CR or LF inside a name or a value would start a header the handler never set.
        raise ValueError("a CR or LF in a response header")
    lines.insert(0, f"HTTP/{version[0]}.{version[1]} {status} {resp._reason}")  # aiohttp refuses CR/LF in a reason
    if declared is not None:
        length: int | None = int(declared)
    elif not no_length and (size or (status != 304 and method != "HEAD")):
        lines.append(f"Content-Length: {size}")
        length = size
    else:
        length = None
    if not empty and length != 0 and "Content-Type" not in headers:
        lines.append("Content-Type: application/octet-stream")
    if "Date" not in headers:
        lines.append(f"Date: {rfc822_formatted_time()}")
    if "Server" not in headers:
        lines.append(_SERVER)
    if "Connection" not in headers:
        if keep_alive:
            if version[1] == 0:
                lines.append("Connection: keep-alive")
        elif version[1] == 1:
            lines.append("Connection: close")
    lines.append("\r\n")
    out = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    if size and not empty:
        body = body[:length] if length is not None and length < size else body
        if size > _JOIN_UNDER:  # a large body goes as it is, after the head (a writev): not copied
            return [out, body], keep_alive
        out += body
    return [out], keep_alive


async def answer(conn: "BaseProtocol", request: "EntryRequest", resp: web.StreamResponse, closing: bool) -> bool:
    """Write `resp` on `conn` (unless the handler streamed it already); whether the
    connection stays open after it."""
    if not resp.prepared:
        whole = whole_response(resp, request, closing)
        if whole is not None:
            data, keep = whole
            if len(data) == 1:
                conn.transport.write(data[0])  # type: ignore[union-attr]
            else:
                conn.transport.writelines(data)  # type: ignore[union-attr]
            if conn.writing_paused:  # the caller reads slower than it asks: wait for it
                await conn._drain_helper()
            return keep
        await resp.prepare(request)
    await resp.write_eof()
    return bool(resp.keep_alive) and not closing


def plain_error(status: int, reason: str, code: str, message: str) -> bytes:
    """An answer to a request the server could not take as one (malformed, a head too
    large): JSON like every error of the entries, and the connection closes after it."""
    body = orjson.dumps({"error": code, "message": message})
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Date: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\nConnection: close\r\n\r\n"
            ).encode() + body
