"""HTTP faithfulness through the tunnel, both ways: what the caller sends is
what the backend gets (and back), except what a proxy must change: hop-by-hop
headers dropped, X-Forwarded-* added, a route's header edits and set_host.
Route matching (host exact and *.suffix, path prefix, methods, header
equality, first match wins) is checked through the real gateway."""
from __future__ import annotations

import hashlib
import json
import re
import socket
from http.client import HTTPConnection

import pytest

from tests.harness import Stack, header_values, http, raw_request

ROUTES = [
    {"name": "exact", "host": "exact.test", "group": "g1", "add_headers": {"x-route": "exact"}},
    {"name": "wild", "host": "*.wild.test", "group": "g1", "add_headers": {"x-route": "wild"}},
    {"name": "first", "path_prefix": "/echo/order", "group": "g1", "add_headers": {"x-route": "first"}},
    {"name": "second", "path_prefix": "/echo/order", "group": "g1", "add_headers": {"x-route": "second"}},
    {"name": "post-only", "path_prefix": "/echo/m", "methods": ["POST", "PUT"], "group": "g1",
     "add_headers": {"x-route": "post-only"}},
    {"name": "blue", "path_prefix": "/echo/tenant", "headers": {"X-Tenant": "blue"}, "group": "g1",
     "add_headers": {"x-route": "blue"}},
    {"name": "sethost", "path_prefix": "/sethost", "strip_prefix": True, "set_host": "internal.example",
     "group": "g1", "add_headers": {"x-route": "sethost"}},
    {"name": "edit", "path_prefix": "/echo/edit", "group": "g1", "remove_headers": ["X-Secret"],
     "add_headers": {"x-route": "edit", "X-Replaced": "new", "x-added": "yes"}},
    {"name": "api", "path_prefix": "/echo/api", "group": "g1", "add_headers": {"x-route": "api"}},
    {"name": "default", "path_prefix": "/", "group": "g1", "add_headers": {"x-route": "default"}},
]


@pytest.fixture(scope="module")
def stack(make_module_stack) -> Stack:
    """One gateway (one worker), one client, one backend for the whole module:
    these tests only read, so they can share it."""
    return make_module_stack(settings={"workers": 1}, routes=ROUTES)


def _port(stack: Stack, way: str) -> int:
    """ingress: the gateway's public entry; egress: the client's local entry."""
    return stack.http_port if way == "ingress" else stack.clients["c1"][1]


def _echo(stack: Stack, way: str, method: str = "GET", target: str = "/echo", headers=None, body=None) -> dict:
    r = raw_request(_port(stack, way), method, target, headers, body)
    assert r.status == 200, (r.status, r.body[:300])
    assert r.header("x-request-id") and r.header("x-trace-id")
    return json.loads(r.body)


def _sent(echo: dict, name: str) -> list[str]:
    """Values of a request header as the backend received it."""
    return header_values(echo["headers"], name)


BOTH = pytest.mark.parametrize("way", ["ingress", "egress"])


@BOTH
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"])
def test_method_raw_path_and_query_kept(stack, way, method):
    target = "/echo/a%2Fb/%7Euser/c%20d;p=1?x=1&x=2&y=%41+b&empty=&flag&enc=%2F%3F%26"
    body = b"payload" if method in ("POST", "PUT", "PATCH") else None
    echo = _echo(stack, way, method, target, body=body)
    assert echo["method"] == method
    assert echo["raw_path"] == target  # path and query, byte for byte (aiohttp's query_string is decoded)
    assert echo["size"] == (len(body) if body else 0)


@BOTH
def test_repeated_request_headers_stay_repeated_and_in_order(stack, way):
    headers = [("X-Multi", "one"), ("Accept", "text/a"), ("X-Multi", "two"), ("Accept", "text/b"),
               ("X-Multi", "three, four")]
    echo = _echo(stack, way, headers=headers)
    assert _sent(echo, "X-Multi") == ["one", "two", "three, four"]
    assert _sent(echo, "Accept") == ["text/a", "text/b"]


@BOTH
def test_two_set_cookie_headers_stay_two(stack, way):
    r = raw_request(_port(stack, way), "GET", "/cookies")
    assert r.status == 200
    assert header_values(r.headers, "Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


@BOTH
def test_backend_errors_pass_through_unchanged(stack, way):
    r = raw_request(_port(stack, way), "GET", "/status/500")
    assert r.status == 500 and r.body == b"status 500\n"
    assert r.header("x-request-id")  # ours is added; the body is the backend's


@BOTH
def test_head_has_headers_and_no_body(stack, way):
    conn = HTTPConnection("127.0.0.1", _port(stack, way), timeout=10)
    try:
        # /hello, not /bytes/N: the demo backend's streamed /bytes/N writes a body even for HEAD.
        r = raw_request(0, "HEAD", "/hello", [("Host", "h.test")], conn=conn)
        assert r.status == 200 and r.body == b""
        assert r.header("Content-Length") == "100"
        # No stray body bytes on the connection: the next answer on it is intact.
        r = raw_request(0, "GET", "/bytes/10", [("Host", "h.test")], conn=conn)
        assert r.status == 200 and r.body == b"\xab" * 10
    finally:
        conn.close()


@BOTH
@pytest.mark.parametrize("code", [204, 304])
def test_204_and_304_have_no_body(stack, way, code):
    conn = HTTPConnection("127.0.0.1", _port(stack, way), timeout=10)
    try:
        r = raw_request(0, "GET", f"/status/{code}", [("Host", "h.test")], conn=conn)
        assert r.status == code and r.body == b""
        assert r.header("Transfer-Encoding") is None
        assert r.header("Content-Length") in (None, "0")
        r = raw_request(0, "GET", "/hello", [("Host", "h.test")], conn=conn)
        assert r.status == 200 and len(r.body) == 100
    finally:
        conn.close()


@BOTH
def test_hop_by_hop_headers_are_removed(stack, way):
    headers = [
        ("Connection", "keep-alive, X-Hop-A, x-hop-b"),
        ("X-Hop-A", "1"),
        ("X-Hop-B", "2"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Upgrade", "h2c-not-really"),
        ("Proxy-Authorization", "Basic c2VjcmV0"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Anything", "x"),
        ("Trailer", "X-Checksum"),
        ("X-Kept", "yes"),
    ]
    echo = _echo(stack, way, headers=headers)
    names = {n.lower() for n, _ in echo["headers"]}
    for gone in ("x-hop-a", "x-hop-b", "keep-alive", "te", "upgrade", "proxy-connection", "proxy-anything",
                 "trailer"):
        assert gone not in names, (gone, echo["headers"])
    # Proxy-Authorization goes on like any end-to-end header (as reverse proxies pass it on).
    assert _sent(echo, "Proxy-Authorization") == ["Basic c2VjcmV0"]
    # The proxy's own connection to the backend may say keep-alive; never what the caller listed.
    for v in _sent(echo, "Connection"):
        assert "x-hop" not in v.lower()
    assert _sent(echo, "X-Kept") == ["yes"]


SPOOFED = [("Host", "svc.example:8443"), ("X-Forwarded-For", "10.1.2.3"), ("X-Forwarded-Proto", "https"),
           ("X-Forwarded-Host", "spoofed.example")]


@BOTH
def test_x_forwarded_headers_are_set_by_the_proxy_for_an_untrusted_caller(stack, way):
    echo = _echo(stack, way, headers=SPOOFED)
    assert _sent(echo, "Host") == ["svc.example:8443"]
    assert _sent(echo, "X-Forwarded-For") == ["127.0.0.1"]
    assert _sent(echo, "X-Forwarded-Proto") == ["http"]
    assert _sent(echo, "X-Forwarded-Host") == ["svc.example:8443"]


@pytest.fixture(scope="module")
def trusting(make_module_stack) -> Stack:
    """A stack whose gateway and client trust the callers on 127.0.0.0/8 as proxies."""
    return make_module_stack(settings={"workers": 1, "trusted_proxies": ["127.0.0.0/8"]}, routes=ROUTES,
                             client_extra=["--trusted-proxies", "127.0.0.1"])


@BOTH
def test_x_forwarded_headers_of_a_trusted_proxy_are_kept_and_appended_to(trusting, way):
    echo = _echo(trusting, way, headers=SPOOFED)
    assert _sent(echo, "X-Forwarded-For") == ["10.1.2.3, 127.0.0.1"]
    assert _sent(echo, "X-Forwarded-Proto") == ["https"]
    assert _sent(echo, "X-Forwarded-Host") == ["spoofed.example"]


# RFC 7239's Forwarded, and X-Forwarded-* spelt with `_` (a CGI or WSGI backend reads X_Forwarded_For
# as X-Forwarded-For): what a caller says of where it is from, never what the backend gets from an untrusted one.
OTHER_SPOOFS = [("Host", "svc.example:8443"), ("Forwarded", "for=6.6.6.6;proto=https;host=spoofed.example"),
                ("X_Forwarded_For", "6.6.6.6"), ("X-Forwarded_Host", "spoofed.example"),
                ("x_forwarded_proto", "https")]


@BOTH
def test_forwarded_and_underscore_spellings_from_an_untrusted_caller_are_dropped(stack, way):
    echo = _echo(stack, way, headers=OTHER_SPOOFS)
    sent = {n.lower() for n, _ in echo["headers"]}
    assert not sent & {"forwarded", "x_forwarded_for", "x-forwarded_host", "x_forwarded_proto"}, echo["headers"]
    assert _sent(echo, "X-Forwarded-For") == ["127.0.0.1"]
    assert _sent(echo, "X-Forwarded-Host") == ["svc.example:8443"]


@BOTH
def test_a_trusted_proxys_forwarded_is_kept_but_not_underscore_spellings(trusting, way):
    echo = _echo(trusting, way, headers=OTHER_SPOOFS)
    assert _sent(echo, "Forwarded") == ["for=6.6.6.6;proto=https;host=spoofed.example"]
    sent = {n.lower() for n, _ in echo["headers"]}
    assert not sent & {"x_forwarded_for", "x-forwarded_host", "x_forwarded_proto"}, echo["headers"]


def test_set_host_replaces_host_and_forwarded_host_keeps_the_original(stack):
    echo = _echo(stack, "ingress", target="/sethost/echo/x?q=1", headers=[("Host", "public.example")])
    assert echo["raw_path"] == "/echo/x?q=1"  # strip_prefix
    assert _sent(echo, "Host") == ["internal.example"]
    assert _sent(echo, "X-Forwarded-Host") == ["public.example"]
    assert _sent(echo, "x-route") == ["sethost"]


@pytest.mark.parametrize("method,host,path,headers,route", [
    ("GET", "exact.test", "/echo/order", [], "exact"),           # host rule is first: wins over path rules
    ("GET", "exact.test:8080", "/echo", [], "exact"),            # port ignored
    ("GET", "EXACT.test", "/echo", [], "exact"),                 # host is case-insensitive
    ("GET", "notexact.test", "/echo", [], "default"),
    ("GET", "a.wild.test", "/echo", [], "wild"),
    ("GET", "deep.a.wild.test", "/echo", [], "wild"),
    ("GET", "wild.test", "/echo", [], "default"),                # *.suffix needs a subdomain
    ("GET", "xwild.test", "/echo", [], "default"),
    ("GET", "h.test", "/echo/order/x", [], "first"),             # first match wins
    ("POST", "h.test", "/echo/m", [], "post-only"),
    ("PUT", "h.test", "/echo/m/1", [], "post-only"),
    ("GET", "h.test", "/echo/m", [], "default"),                 # method not in the rule
    ("GET", "h.test", "/echo/tenant", [("X-Tenant", "blue")], "blue"),
    ("GET", "h.test", "/echo/tenant", [("x-tenant", "blue")], "blue"),  # header names are case-insensitive
    ("GET", "h.test", "/echo/tenant", [("X-Tenant", "red")], "default"),
    ("GET", "h.test", "/echo/tenant", [], "default"),
    ("GET", "h.test", "/echo/api", [], "api"),
    ("GET", "h.test", "/echo/api/v1?x=1", [], "api"),
    ("GET", "h.test", "/echo/apix", [], "default"),              # prefix is segment-aware
])
def test_route_matching(stack, method, host, path, headers, route):
    body = b"" if method in ("POST", "PUT") else None
    echo = _echo(stack, "ingress", method, path, [("Host", host), *headers], body)
    assert _sent(echo, "x-route") == [route]
    assert echo["raw_path"] == path
    assert _sent(echo, "Host") == [host]


def test_route_adds_replaces_and_removes_headers(stack):
    echo = _echo(stack, "ingress", target="/echo/edit", headers=[
        ("X-Secret", "s1"), ("x-secret", "s2"), ("X-Replaced", "old"), ("X-Other", "kept"),
    ])
    assert _sent(echo, "X-Secret") == []
    assert _sent(echo, "X-Replaced") == ["new"]
    assert _sent(echo, "x-added") == ["yes"]
    assert _sent(echo, "X-Other") == ["kept"]


@BOTH
def test_ids_on_every_response_and_traceparent_echoed(stack, way):
    port = _port(stack, way)
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = raw_request(port, "GET", "/hello", [("traceparent", f"00-{trace}-00f067aa0ba902b7-01")])
    assert r.status == 200 and r.header("x-trace-id") == trace
    r = raw_request(port, "GET", "/hello", [("x-trace-id", "my-trace.42")])
    assert r.header("x-trace-id") == "my-trace.42"
    ids = set()
    for target in ("/hello", "/hello", "/status/404", "/status/503", "/bytes/0"):
        r = raw_request(port, "GET", target)
        assert r.header("x-request-id") and r.header("x-trace-id") and len(r.header("x-trace-id")) == 32
        ids.add(r.header("x-request-id"))
    assert len(ids) == 5
    # The backend got the caller's traceparent unchanged.
    echo = _echo(stack, way, headers=[("traceparent", f"00-{trace}-00f067aa0ba902b7-01")])
    assert _sent(echo, "traceparent") == [f"00-{trace}-00f067aa0ba902b7-01"]


def _read_until(sock: socket.socket, marker: bytes, limit: int = 65536) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before {marker!r}; got {data!r}"
        data += chunk
        assert len(data) < limit
    return data


@BOTH
def test_expect_100_continue_is_answered_before_the_body(stack, way):
    # The caller sends the head, waits for the interim 100, and only then the body (what curl -T does).
    port = _port(stack, way)
    body = b"x" * 200_000
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /sink HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        interim = _read_until(sock, b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        rest = interim.split(b"\r\n\r\n", 1)[1]
        sock.sendall(body)
        head = rest + _read_until(sock, b"\r\n\r\n") if b"\r\n\r\n" not in rest else rest
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        payload = head.split(b"\r\n\r\n", 1)[1]
        while len(payload) < length:
            payload += sock.recv(65536)
    assert json.loads(payload) == {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}


@BOTH
def test_unknown_expectation_is_417_and_http10_ignores_it(stack, way):
    r = raw_request(_port(stack, way), "POST", "/sink", [("Expect", "something-else")], b"abc")
    assert r.status == 417 and r.json()["error"] == "expectation_failed"
    port = _port(stack, way)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /sink HTTP/1.0\r\nHost: x\r\nContent-Length: 3\r\nExpect: something-else\r\n\r\nabc".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), answer[:200]
    # The entry deals with Expect: the backend never sees it.
    echo = _echo(stack, way, "POST", "/echo", [("Expect", "100-continue")], b"abc")
    assert _sent(echo, "expect") == []


def test_nothing_left_pending(stack):
    assert http("GET", f"{stack.url}/hello").status == 200
    stack.wait_idle()
