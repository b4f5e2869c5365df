"""Request-level failover (issue 18 part 4), on one host with real processes: two
clients of g1 (c1, c2, one connection each) behind a gateway of two workers. The
client serving a request is SIGKILLed while the backend holds it:

- a GET is retried once on the other client and succeeds, the access log says so;
- a POST fails 502 `tunnel_closed`, unless its route says `retry = true`: then its
  body (kept whole) goes again and arrives intact;
- a body over `retry_body_bytes` is never retried;
- a retry is made once: when the second client dies too, the caller gets 502.

Every process is stopped after each test (the procs fixture), also when it fails."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import time

import orjson
import pytest

from tests.harness import Stack, backend_stats, http, signal_client, wait_until
from tests.test_failures import Background

KEPT = 16384  # retry_body_bytes in these tests


@pytest.fixture
def two(procs, tmp_path) -> Stack:
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    stack.access_log = tmp_path / "access.log"
    routes = [{"name": "retry", "path_prefix": "/retry", "group": "g1", "retry": True, "strip_prefix": True,
               "timeout": 20.0},
              {"name": "short", "path_prefix": "/short", "group": "g1", "timeout": 1.0, "strip_prefix": True},
              {"name": "main", "path_prefix": "/", "group": "g1", "timeout": 20.0}]
    stack.start_gateway(settings={"workers": 2, "access_log": str(stack.access_log), "retry_body_bytes": KEPT},
                        routes=routes)
    for cid in ("c1", "c2"):
        stack.start_client(cid, extra=["--connections", "1"])
    return stack


def serving_client(stack: Stack) -> str:
    """The client the backend's one request in flight came through (the one serving it)."""
    found: list[str] = []

    def one() -> bool:
        found[:] = [cid for cid in ("c1", "c2")
                    if stack.clients[cid][0].alive() and stack.client_status(cid)["serving"]]
        return len(found) == 1 and backend_stats(stack)["inflight"] >= 1

    wait_until(one, 10, what="one client serving the request")
    return found[0]


def access_line(stack: Stack, request_id: str) -> dict:
    line: list[dict] = []

    def written() -> bool:
        rows = [orjson.loads(x) for x in stack.access_log.read_bytes().splitlines() if x.strip()]
        line[:] = [r for r in rows if r["request_id"] == request_id]
        return bool(line)

    wait_until(written, 5, what=f"access line of {request_id}")
    return line[0]


def kill_serving(stack: Stack) -> tuple[str, float]:
    victim = serving_client(stack)
    signal_client(stack, victim, signal.SIGKILL)
    return victim, time.monotonic()


def test_a_get_is_retried_on_the_other_client(two):
    pending = Background("GET", f"{two.url}/slow?ms=1500&token=again")
    victim, killed = kill_serving(two)
    r = pending.result(15)
    assert r.status == 200 and r.body == b"again", r.body[:300]
    line = access_line(two, r.header("x-request-id"))
    survivor = "c2" if victim == "c1" else "c1"
    assert line["retried"] is True and line["client_id"] == survivor and line["status"] == 200, line
    print(f"\nGET retried: answered {pending.done_at - killed:.2f}s after the kill (the backend takes 1.5 s)")
    # Not retried when nothing failed.
    r = http("GET", f"{two.url}/hello")
    assert r.status == 200 and access_line(two, r.header("x-request-id"))["retried"] is False
    two.wait_idle()


def test_a_post_is_not_retried_unless_its_route_says_so(two):
    body = os.urandom(KEPT)
    pending = Background("POST", f"{two.url}/slow?ms=10000", body=body)
    _victim, killed = kill_serving(two)
    r = pending.result(10)
    assert r.status == 502 and r.json()["error"] == "tunnel_closed", r.body[:300]
    assert pending.done_at - killed < 2.0
    assert access_line(two, r.header("x-request-id"))["retried"] is False
    # retry = true: the kept body goes again, whole.
    two.start_client(_victim, extra=["--connections", "1"])
    pending = Background("POST", f"{two.url}/retry/slow?ms=1500", body=body)
    kill_serving(two)
    r = pending.result(15)
    assert r.status == 200, r.body[:300]
    assert r.header("x-body-sha256") == hashlib.sha256(body).hexdigest() and r.header("x-body-size") == str(KEPT)
    assert access_line(two, r.header("x-request-id"))["retried"] is True
    two.wait_idle()


def test_a_body_over_retry_body_bytes_is_not_retried(two):
    pending = Background("POST", f"{two.url}/retry/slow?ms=10000", body=os.urandom(KEPT + 1))
    kill_serving(two)
    r = pending.result(10)
    assert r.status == 502 and r.json()["error"] == "tunnel_closed", r.body[:300]
    assert access_line(two, r.header("x-request-id"))["retried"] is False
    two.wait_idle()


def test_the_retry_is_made_once(two):
    pending = Background("GET", f"{two.url}/slow?ms=10000")
    first, _ = kill_serving(two)
    second, killed = kill_serving(two)  # the retry, on the other client
    assert {first, second} == {"c1", "c2"}
    r = pending.result(10)
    assert r.status == 502 and r.json()["error"] == "tunnel_closed", r.body[:300]
    assert pending.done_at - killed < 2.0
    assert access_line(two, r.header("x-request-id"))["retried"] is True
    two.wait_idle()


def test_a_declared_body_that_never_comes_times_out(two):
    """A GET that may be retried is read whole first: one that declares a body and sends
    none gets 504 within the route's timeout (1 s here), not a slot held for ever."""
    with socket.create_connection(("127.0.0.1", two.http_port), timeout=10) as s:
        started = time.monotonic()
        s.sendall(f"GET /short/hello HTTP/1.1\r\nHost: 127.0.0.1:{two.http_port}\r\nContent-Length: 1000\r\n\r\n"
                  .encode())
        head = s.recv(4096).decode()
        took = time.monotonic() - started
    assert head.startswith("HTTP/1.1 504") and '"timeout"' in head, head[:300]
    assert took < 3.0, f"504 after {took:.2f}s"
    assert http("GET", f"{two.url}/hello").status == 200
