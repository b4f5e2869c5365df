"""The check of a request head that came through a tunnel (gateway/http/request_head.py),
before the serving side writes it to an HTTP/1.1 upstream: a table of forged heads, each
refused as bad_request (400); hop-by-hop headers dropped, with those Connection names; a
good head passed on unchanged, in order and with its repeats, with its declared length.
And the upstream client's enforcement of that length on the body (declared_body)."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest

from gateway.http.request_head import check_request_head
from gateway.http.upstream_connection import BodyLengthError, declared_body, declared_length
from gateway.tunnel.errors import STATUS, TunnelError

GOOD = [
    ("Host", "api.example.com"),
    ("User-Agent", "curl/8.5.0"),
    ("Accept", "*/*"),
    ("Cookie", "a=1"),
    ("x-custom", "caf\xe9 \t tab and obs-text"),
    ("cookie", "b=2"),
    ("Content-Length", "11"),
    ("Proxy-Authorization", "Basic dTpw"),
    ("X-Empty", ""),
]


def test_a_good_head_passes_unchanged_in_order_and_repeats():
    assert check_request_head("POST", "/api/v1/items?x=1&y=%2F", GOOD) == (GOOD, 11)


def test_without_content_length_there_is_no_declared_length():
    assert check_request_head("GET", "/", [("Host", "h")]) == ([("Host", "h")], None)
    assert check_request_head("GET", "/", []) == ([], None)


def test_any_token_is_a_method():
    for method in ("GET", "PURGE", "M-SEARCH", "x.y_z!#$%&'*+^`|~"):
        check_request_head(method, "/", [])


def test_whitespace_around_the_length_is_trimmed_and_zero_is_a_length():
    assert check_request_head("POST", "/", [("Content-Length", " 7\t")]) == ([("Content-Length", "7")], 7)
    assert check_request_head("POST", "/", [("content-length", "0")]) == ([("content-length", "0")], 0)


FORGED = {
    # the method
    "empty method": ("", "/", []),
    "space in the method": ("G ET", "/", []),
    "request line in the method": ("GET / HTTP/1.1\r\nHost: x\r\n\r\nGET", "/", []),
    "LF in the method": ("GET\n", "/", []),
    "NUL in the method": ("GET\x00", "/", []),
    "non-ascii method": ("G\xc9T", "/", []),
    # the path
    "CRLF in the path": ("GET", "/a HTTP/1.1\r\nX-Injected: yes\r\n\r\n", []),
    "LF in the path": ("GET", "/a\nb", []),
    "NUL in the path": ("GET", "/a\x00", []),
    "space in the path": ("GET", "/a HTTP/1.0", []),
    "tab in the path": ("GET", "/a\tb", []),
    "DEL in the path": ("GET", "/a\x7f", []),
    # header values
    "CR in a value": ("GET", "/", [("X-A", "1\r")]),
    "LF in a value": ("GET", "/", [("X-A", "1\nX-Injected: yes")]),
    "CRLF smuggling in a value": ("GET", "/", [("X-A", "1\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x")]),
    "NUL in a value": ("GET", "/", [("X-A", "a\x00b")]),
    "another control in a value": ("GET", "/", [("X-A", "a\x0bb")]),
    "DEL in a value": ("GET", "/", [("X-A", "a\x7fb")]),
    "beyond latin-1 in a value": ("GET", "/", [("X-A", "\u2028")]),
    "CR in the last of many values": ("GET", "/", [*GOOD, ("X-Z", "z\r")]),
    # header names
    "CRLF in a name": ("GET", "/", [("X-A\r\nX-Injected", "yes")]),
    "space in a name": ("GET", "/", [("X A", "1")]),
    "colon in a name": ("GET", "/", [("X-A:", "1")]),
    "empty name": ("GET", "/", [("", "1")]),
    "pseudo-header name": ("GET", "/", [(":path", "/admin")]),
    "non-ascii name": ("GET", "/", [("X-\xe9", "1")]),
    # framing
    "two Content-Lengths": ("POST", "/", [("Content-Length", "5"), ("Content-Length", "40")]),
    "two equal Content-Lengths": ("POST", "/", [("Content-Length", "5"), ("content-length", "5")]),
    "a Content-Length list": ("POST", "/", [("Content-Length", "5, 5")]),
    "a signed Content-Length": ("POST", "/", [("Content-Length", "+5")]),
    "a negative Content-Length": ("POST", "/", [("Content-Length", "-1")]),
    "a hex Content-Length": ("POST", "/", [("Content-Length", "0x5")]),
    "an empty Content-Length": ("POST", "/", [("Content-Length", "")]),
    "a non-ascii digit Content-Length": ("POST", "/", [("Content-Length", "\u0665")]),
    "an overflowing Content-Length": ("POST", "/", [("Content-Length", "9" * 19)]),
    "Transfer-Encoding and Content-Length": ("POST", "/", [("Transfer-Encoding", "chunked"), ("Content-Length", "5")]),
    "Content-Length and Transfer-Encoding": ("POST", "/", [("Content-Length", "5"), ("transfer-encoding", "chunked")]),
}


@pytest.mark.parametrize("name", list(FORGED))
def test_a_forged_head_is_a_bad_request(name):
    method, path, headers = FORGED[name]
    with pytest.raises(TunnelError) as err:
        check_request_head(method, path, headers)
    assert err.value.code == "bad_request" and STATUS[err.value.code] == 400
    # The message says what is wrong, never repeats what was sent.
    assert "Injected" not in err.value.message and "smuggled" not in err.value.message
    assert "\r" not in err.value.message and "\n" not in err.value.message


def test_hop_by_hop_headers_and_those_connection_names_are_dropped():
    sent = [("Host", "h"), ("Connection", "keep-alive, X-Secret, , Content-Length"), ("X-Secret", "s"),
            ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"), ("TE", "trailers"),
            ("Trailer", "X-T"), ("Upgrade", "h2c"), ("Proxy-Connection", "keep-alive"), ("Proxy-Foo", "1"),
            ("Proxy-Authorization", "Basic dTpw"), ("X-Kept", "yes"), ("x-secret", "again")]
    assert check_request_head("POST", "/", sent) == (
        [("Host", "h"), ("Proxy-Authorization", "Basic dTpw"), ("X-Kept", "yes")], None)


def test_a_websocket_upgrade_loses_its_upgrade_headers_the_upstream_client_writes_its_own():
    sent = [("Host", "h"), ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Protocol", "chat")]
    assert check_request_head("GET", "/ws", sent) == ([("Host", "h"), ("Sec-WebSocket-Protocol", "chat")], None)


def test_connection_cannot_drop_the_declared_length():
    sent = [("Connection", "content-length"), ("Content-Length", "3")]
    assert check_request_head("POST", "/", sent) == ([("Content-Length", "3")], 3)


def test_a_name_refused_once_is_refused_again_and_a_good_one_is_kept_after():
    for _ in range(2):
        with pytest.raises(TunnelError):
            check_request_head("GET", "/", [("Bad Name", "1")])
        with pytest.raises(TunnelError):
            check_request_head("G T", "/", [])
        assert check_request_head("GET", "/", [("Good-Name", "1")]) == ([("Good-Name", "1")], None)


# -- the declared length, enforced on the body the upstream client sends ----------------


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _send(length: int, *parts: bytes) -> tuple[bytes, BaseException | None]:
    """What declared_body lets through of `parts`, and how it ended."""
    async def run() -> tuple[bytes, BaseException | None]:
        out = b""
        try:
            async for chunk in declared_body(_chunks(*parts), length):
                out += chunk
        except BodyLengthError as exc:
            return out, exc
        return out, None
    return asyncio.run(run())


def test_a_body_of_its_declared_length_goes_whole():
    assert _send(10, b"hello", b"world") == (b"helloworld", None)
    assert _send(0) == (b"", None)


def test_a_body_past_its_length_stops_there_and_fails():
    sent, err = _send(5, b"hel", b"loGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sent == b"hello" and isinstance(err, BodyLengthError) and "past" in str(err)
    sent, err = _send(5, b"hello", b"GET /smuggled HTTP/1.1\r\n\r\n")
    assert sent == b"hello" and isinstance(err, BodyLengthError)
    sent, err = _send(0, b"x")
    assert sent == b"" and isinstance(err, BodyLengthError)


def test_a_body_short_of_its_length_fails_at_its_end():
    sent, err = _send(10, b"hello")
    assert sent == b"hello" and isinstance(err, BodyLengthError) and "short" in str(err)
    sent, err = _send(3)
    assert sent == b"" and isinstance(err, BodyLengthError)


def test_the_declared_length_is_read_from_the_headers_sent():
    assert declared_length([("Host", "h"), ("content-length", "42")]) == 42
    assert declared_length([("Host", "h")]) is None
