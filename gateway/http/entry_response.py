"""A whole answer on an entry connection, as bytes: what aiohttp's
Response.prepare and write_eof would write for it (the same status line,
Content-Length, Content-Type, Date, Server and Connection rules), built in
one piece so that it leaves in one write. A streamed answer goes through
aiohttp's own StreamResponse and writer instead (`entry_request.py`)."""
from __future__ import annotations

import orjson

from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time, should_remove_content_length
from aiohttp.http import SERVER_SOFTWARE

if TYPE_CHECKING:
    from gateway.http.entry_request import EntryRequest

__all__ = ["whole_response", "plain_error"]

def whole_response(resp: web.StreamResponse, request: "EntryRequest", closing: bool) -> tuple[bytes, bool] | None:
    """The bytes of `resp`, not yet started, and whether the connection stays
    open after it; None for one only aiohttp can write (a payload object or
    a stream for a body, compression, cookies, chunking asked for)."""
    body = resp.body if isinstance(resp, web.Response) else None
    if not isinstance(resp, web.Response) or resp.chunked or resp.compression \
            or getattr(resp, "_cookies", None) or not (body is None or isinstance(body, (bytes, bytearray))):
        return None
    method, status, version = request.method, resp.status, request.version
    keep_alive = resp.keep_alive
    if keep_alive is None:
        keep_alive = request.keep_alive
    keep_alive = keep_alive and not closing
    headers = resp.headers
    empty = must_be_empty_body(method, status)
    no_length = should_remove_content_length(method, status)
    size = len(body) if body else 0
    lines = [f"HTTP/{version[0]}.{version[1]} {status} {resp.reason}\r\n"]
    length: int | None = None
    for name, value in headers.items():
        low = name.lower()
        if low == "content-length":
            if no_length:
                continue
            length = int(value)
        elif low == "transfer-encoding" and empty:
            continue
        lines.append(f"{name}: {value}\r\n")
    if length is None and not no_length and (size or (status != 304 and method != "HEAD")):
        lines.append(f"Content-Length: {size}\r\n")
        length = size
    if not empty and length != 0 and "Content-Type" not in headers:
        lines.append("Content-Type: application/octet-stream\r\n")
    if "Date" not in headers:
        lines.append(f"Date: {rfc822_formatted_time()}\r\n")
    if "Server" not in headers:
        lines.append(f"Server: {SERVER_SOFTWARE}\r\n")
    if "Connection" not in headers:
        if keep_alive and version[1] == 0:
            lines.append("Connection: keep-alive\r\n")
        elif not keep_alive and version[1] == 1:
            lines.append("Connection: close\r\n")
    lines.append("\r\n")
    head = "".join(lines)
    if head.count("\n") != len(lines) or head.count("\r") != len(lines):
        # A CR or LF inside a name or a value would start a header the handler never set.
        raise ValueError("a CR or LF in a response header")
    out = head.encode("utf-8", "surrogateescape")
    if size and not empty:
        out += body[:length] if length is not None and length < size else body
    return out, keep_alive


def plain_error(status: int, reason: str, code: str, message: str) -> bytes:
    """An answer to a request the server could not take as one (malformed, a head too
    large): JSON like every error of the entries, and the connection closes after it."""
    body = orjson.dumps({"error": code, "message": message})
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Date: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\nConnection: close\r\n\r\n"
            ).encode() + body
