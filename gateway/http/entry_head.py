"""What the entries' server (`entry_connection.py`) refuses in a request head
beyond what llhttp refuses, as aiohttp's parser refuses it (400): a repeat of
a header RFC 9110 allows once, a NUL in a value, over 128 headers, an
HTTP/1.1 request without Host, the WebSocket draft's Sec-WebSocket-Key1. And
a head written back out, for the aiohttp server that takes over an upgrade."""
from __future__ import annotations

from typing import Mapping

from gateway.http.entry_request import HTTP10, HTTP11, HttpVersion

__all__ = ["BadHead", "HeadTooLarge", "check_field", "check_head", "version_of", "head_bytes"]

SINGLETONS = frozenset({b"content-length", b"content-location", b"content-range", b"content-type", b"etag",
                        b"host", b"max-forwards", b"server", b"transfer-encoding", b"user-agent"})
MAX_HEADERS = 128


class HeadTooLarge(Exception):
    pass


class BadHead(Exception):
    pass


def check_field(raw: list[tuple[bytes, bytes]]) -> None:
    """The last field of `raw`, the head's fields so far: BadHead when it is refused."""
    name, value = raw[-1]
    if b"\x00" in value:
        raise BadHead(f"a NUL byte in header {name[:100]!r}")
    low = name.lower()
    if low in SINGLETONS and any(n.lower() == low for n, _ in raw[:-1]):
        raise BadHead(f"duplicate {name.decode('latin-1')!r} header")
    if len(raw) > MAX_HEADERS:
        raise BadHead(f"over {MAX_HEADERS} headers")


def check_head(version: HttpVersion, headers: Mapping[str, str]) -> None:
    """A whole head's fields (case-insensitive `headers`): BadHead when they are refused."""
    if version is HTTP11 and "Host" not in headers:
        raise BadHead("no Host header in an HTTP/1.1 request")
    if "Sec-WebSocket-Key1" in headers:
        raise BadHead("the draft WebSocket handshake (Sec-WebSocket-Key1) is not supported")


def version_of(given: str) -> HttpVersion:
    """The version httptools read ("1.1")."""
    return HTTP11 if given == "1.1" else HTTP10 if given == "1.0" else HttpVersion(*map(int, given.split(".")))


def head_bytes(method: str, url: bytes, version: HttpVersion, raw: list[tuple[bytes, bytes]]) -> bytes:
    """The head as a request line and fields (what llhttp accepted, written plainly)."""
    lines = [f"{method} ".encode("ascii"), url, f" HTTP/{version[0]}.{version[1]}\r\n".encode("ascii")]
    lines += [b"%s: %s\r\n" % pair for pair in raw]
    return b"".join(lines) + b"\r\n"
