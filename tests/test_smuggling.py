"""An HTTP request-smuggling corpus against both HTTP entries: the gateway's
public entry (ingress) and the client's local entry (egress). Each ambiguous
or malformed request gets 400 and its connection is closed (so nothing sent
after it on that connection can be read as a second request); a new
connection is then served normally, and the backend saw nothing of the
refused request."""
from __future__ import annotations

import socket
import time

import pytest

from tests.harness import Stack, backend_stats, http

CORPUS = {
    "cl-and-te": b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "te-and-cl": b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n"
                 b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "two-content-lengths": b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\n"
                           b"helloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "content-length-list": b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 40\r\n\r\nhello",
    "content-length-sign": b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "obs-fold": b"GET /hello HTTP/1.1\r\nHost: x\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n\r\n",
    "space-before-colon": b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n"
                          b"0\r\n\r\n",
    "te-not-chunked-last": b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
                           b"0\r\n\r\n",
    "te-xchunked": b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "bad-chunk-size": b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow": b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"fffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
    "chunk-without-crlf": b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\nhelloXX0\r\n\r\n",
    "bare-cr-in-header": b"GET /hello HTTP/1.1\r\nHost: x\r\nX-A: a\rTransfer-Encoding: chunked\r\n\r\n",
    "nul-in-header": b"GET /hello HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "target-with-space": b"GET /hel lo HTTP/1.1\r\nHost: x\r\n\r\n",
    "target-nul": b"GET /hello\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    "no-target": b"GET  HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad-version": b"GET /hello HTTP/9.9x\r\nHost: x\r\n\r\n",
    "two-hosts": b"GET /hello HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
}


def exchange(port: int, raw: bytes, timeout: float = 10.0) -> tuple[list[bytes], bool]:
    """Send `raw` on a new connection; read until the server closes it. Returns the
    status lines of the responses read and whether the server closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        data = b""
        closed = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            except socket.timeout:
                break
            if not chunk:
                closed = True
                break
            data += chunk
    statuses = [line for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.")]
    return statuses, closed


@pytest.fixture(scope="module")
def stack(make_module_stack) -> Stack:
    return make_module_stack()


@pytest.mark.parametrize("way", ["ingress", "egress"])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_an_ambiguous_request_is_refused_and_its_connection_closed(stack, way, name):
    port = stack.http_port if way == "ingress" else stack.clients["c1"][1]
    before = backend_stats(stack)
    statuses, closed = exchange(port, CORPUS[name])
    assert statuses and statuses[0].split(b" ")[1] == b"400", (name, statuses)
    assert len(statuses) == 1, f"{name}: a second response on the connection: {statuses}"
    assert closed, f"{name}: the connection stayed open after a 400"
    # The next request, on a new connection, is served; the smuggled one never reached the backend.
    url = stack.url if way == "ingress" else stack.local_url()
    assert http("GET", f"{url}/hello").status == 200
    assert backend_stats(stack)["requests"] - before["requests"] == 2  # that GET and the /stats before it
