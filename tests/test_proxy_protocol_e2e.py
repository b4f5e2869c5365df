"""A gateway behind an L4 balancer that speaks the PROXY protocol
(`proxy_protocol = true`), end to end: the caller a v1 or v2 header declares
is the one X-Forwarded-For names and the one /admin/clients shows for a
tunnel; a connection without a header is closed; with TLS the header comes
before the handshake, on the HTTP entry and on the tunnel port (relayed)."""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time

import pytest

from gateway.proxy_protocol import v1_header, v2_header
from tests.harness import Stack, get_json, header_values, wait_until
from tests.test_auth_tls import pki  # noqa: F401  (the module's CA and certificates)

TUNNEL_SOURCE = ("198.51.100.9", 4242)


class Balancer:
    """A tiny L4 balancer on 127.0.0.1: each connection is relayed to `target`
    with a PROXY v2 header (and a TLV) declaring `source` first, as AWS NLB or
    HAProxy would. The real tunnel client has no PROXY support; this adds it."""

    def __init__(self, target: int, source: tuple[str, int]) -> None:
        self.target = target
        self.source = source
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.halt = threading.Event()
        threading.Thread(target=self._accept, name="balancer", daemon=True).start()

    def _accept(self) -> None:
        while not self.halt.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(None)
            up = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            up.settimeout(None)
            self.sockets += [conn, up]
            up.sendall(v2_header(self.source, ("127.0.0.1", self.target), tlvs=b"\xea\x00\x04vpce"))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.halt.set()
        self.listener.close()
        for s in self.sockets:
            s.close()


def _behind(stack: Stack, balancer: Balancer, extra: list[str] | None = None) -> None:
    """Start client c1 of g1 through `balancer` (the harness dials stack.tunnel_port)."""
    real, stack.tunnel_port = stack.tunnel_port, balancer.port
    try:
        stack.start_client("c1", extra=extra)
    finally:
        stack.tunnel_port = real


def _echo(sock: socket.socket, prefix: bytes, headers: str = "") -> tuple[int, dict]:
    """`prefix` (a PROXY header, or nothing) then GET /echo on `sock`; the status and the echo."""
    sock.sendall(prefix + f"GET /echo HTTP/1.1\r\nHost: proxied.test\r\n{headers}\r\n".encode())
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    return response.status, json.loads(body) if response.status == 200 else {"raw": body}


def _forwarded_for(echo: dict) -> list[str]:
    return header_values(echo["headers"], "X-Forwarded-For")


@pytest.fixture(scope="module")
def behind(make_module_stack):
    stack = make_module_stack(settings={"proxy_protocol": True, "header_timeout": 2.0}, client=None)
    balancer = Balancer(stack.tunnel_port, TUNNEL_SOURCE)
    try:
        _behind(stack, balancer)
        yield stack
    finally:
        balancer.close()


def _closed(s: socket.socket) -> bool:
    """The gateway closed `s` without answering (a RST when what it sent was not all read)."""
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True


def _connect(stack: Stack) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.http_port), timeout=15)


def test_v1_header_declares_the_caller(behind):
    destination = ("127.0.0.1", behind.http_port)
    with _connect(behind) as s:
        # The caller's own X-Forwarded-For is replaced (it is no trusted proxy): by the declared address.
        status, echo = _echo(s, v1_header(("203.0.113.7", 50000), destination), "X-Forwarded-For: 10.9.9.9\r\n")
        assert status == 200 and _forwarded_for(echo) == ["203.0.113.7"]
        # The header comes once a connection: the next request on it is the same caller's.
        status, echo = _echo(s, b"")
        assert status == 200 and _forwarded_for(echo) == ["203.0.113.7"]


@pytest.mark.parametrize("source", [("203.0.113.8", 1), ("2001:db8::7", 65535)])
def test_v2_header_declares_the_caller(behind, source):
    with _connect(behind) as s:
        status, echo = _echo(s, v2_header(source, tlvs=b"\x02\x00\x0bexample.com"))
        assert status == 200 and _forwarded_for(echo) == [source[0]]


def test_local_and_unknown_are_the_balancer_itself(behind):
    for header in (v2_header(None), b"PROXY UNKNOWN\r\n"):
        with _connect(behind) as s:
            status, echo = _echo(s, header)
            assert status == 200 and _forwarded_for(echo) == ["127.0.0.1"]


def test_a_connection_without_a_header_is_closed(behind):
    for first in (b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"[:-2] + b"\n"):
        with _connect(behind) as s:
            s.sendall(first)
            assert _closed(s)
    # One that sends nothing is closed after header_timeout (2 s here).
    t0 = time.monotonic()
    with _connect(behind) as s:
        assert s.recv(1) == b""
    assert 1.5 < time.monotonic() - t0 < 8
    wait_until(lambda: "connection without a valid PROXY header closed" in behind.gateway.output(), 5,
               what="the refusal logged")
    line = next(json.loads(x) for x in behind.gateway.output().splitlines()
                if "connection without a valid PROXY header closed" in x and x.startswith("{"))
    assert line["peer"].startswith("127.0.0.1:") and line["level"].lower() == "info"
    # The gateway serves on.
    with _connect(behind) as s:
        assert _echo(s, v1_header(("203.0.113.7", 1), ("127.0.0.1", 1)))[0] == 200


def test_tunnel_client_behind_the_balancer(behind):
    rows = get_json(f"{behind.admin_url}/admin/clients")["clients"]
    assert rows and {r["remote"] for r in rows} == {"ipv4:198.51.100.9:4242"}


def test_tls_after_the_header(make_stack, pki):  # noqa: F811
    """http_tls and TLS on the tunnel port: the header is plaintext before the handshake;
    the tunnel's TLS passes the relay unchanged (one certificate, SAN per node)."""
    tls = {"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key")}
    stack = make_stack(settings={**tls, "http_tls": True, "proxy_protocol": True, "header_timeout": 2.0},
                       client=None)
    balancer = Balancer(stack.tunnel_port, TUNNEL_SOURCE)
    try:
        _behind(stack, balancer, extra=["--tls", "--tls-ca", str(pki / "ca.pem")])
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with _connect(stack) as raw:
            raw.sendall(v1_header(("203.0.113.9", 443), ("127.0.0.1", stack.http_port)))
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                status, echo = _echo(s, b"")
        assert status == 200 and _forwarded_for(echo) == ["203.0.113.9"]
        rows = get_json(f"{stack.admin_url}/admin/clients")["clients"]
        assert rows and {r["remote"] for r in rows} == {"ipv4:198.51.100.9:4242"}
        # A TLS caller without the header is refused before any handshake.
        with _connect(stack) as raw, pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(raw, server_hostname="localhost")
    finally:
        balancer.close()
