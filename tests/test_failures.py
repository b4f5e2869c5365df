"""Every row of the failure table in DESIGN.md, end to end with real processes:
the status and JSON error body the user sees, how fast, and that nothing is
left behind (pending tables empty on the gateway and the client afterwards)."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import threading
import time

import aiohttp
import pytest

from tests.harness import Response, Stack, TOKEN, backend_stats, free_port, http, raw_request, signal_client, wait_until

TRACE = "0af7651916cd43dd8448eb211c80319c"


def _stack(procs, tmp_path, settings: dict | None = None, client_extra: list[str] | None = None) -> Stack:
    """One worker, one client (c1, one connection) of g1; g2 has no client.

    ingress routes: /short (timeout 1 s) and the catch-all for Host 127.0.0.1 go
    to g1, /nobody to g2; any other Host matches nothing. g1's clients send
    /dead to a port nothing listens on and give /strict a 1 s timeout of
    their own (the route's is 15 s). Egress forward rules mirror that:
    /short (1 s), /dead, and the catch-all for Host 127.0.0.1."""
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    dead = f"http://127.0.0.1:{free_port()}"
    web = {"servers": [stack.backend_url]}
    groups = {
        "g1": {"tokens": [TOKEN], "upstreams": {"web": web, "dead": {"servers": [dead]}},
               "rules": [{"path_prefix": "/dead", "upstream": "dead", "strip_prefix": True},
                         {"path_prefix": "/strict", "upstream": "web", "timeout": 1.0, "strip_prefix": True},
                         {"path_prefix": "/", "upstream": "web"}]},
        "g2": {"tokens": ["g2-token"], "upstreams": {"web": web}, "rules": [{"path_prefix": "/", "upstream": "web"}]},
    }
    routes = [
        {"name": "short", "path_prefix": "/short", "group": "g1", "timeout": 1.0, "strip_prefix": True},
        {"name": "nobody", "path_prefix": "/nobody", "group": "g2"},
        {"name": "main", "host": "127.0.0.1", "path_prefix": "/", "group": "g1", "timeout": 15.0},
    ]
    forward = [
        {"path_prefix": "/short", "upstream": "backend", "timeout": 1.0, "strip_prefix": True},
        {"path_prefix": "/dead", "upstream": "dead", "strip_prefix": True},
        {"host": "127.0.0.1", "path_prefix": "/", "upstream": "backend"},
    ]
    upstreams = {"backend": web, "dead": {"servers": [dead]}}
    stack.start_gateway(settings={"workers": 1, **(settings or {})}, groups=groups, routes=routes, forward=forward,
                        upstreams=upstreams)
    stack.start_client("c1", extra=["--connections", "1", *(client_extra or [])])
    stack.dead = dead
    return stack


@pytest.fixture
def fstack(procs, tmp_path) -> Stack:
    return _stack(procs, tmp_path)


def _port(stack: Stack, way: str) -> int:
    return stack.http_port if way == "ingress" else stack.clients["c1"][1]


def _base(stack: Stack, way: str) -> str:
    return f"http://127.0.0.1:{_port(stack, way)}"


def assert_error(r: Response, status: int, code: str, client_id: str | None = None) -> dict:
    """A failure as DESIGN.md says users see it: status, JSON body, ids in headers and body."""
    assert r.status == status, (r.status, r.body[:300])
    assert (r.header("Content-Type") or "").startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "message", "request_id", "trace_id", "client_id"}, body
    assert body["error"] == code, body
    assert body["message"] and isinstance(body["message"], str)
    assert body["request_id"] and body["request_id"] == r.header("x-request-id")
    assert body["trace_id"] and body["trace_id"] == r.header("x-trace-id")
    if client_id is not None:
        assert body["client_id"] == client_id, body
    return body


def _timed(fn, *args, **kw) -> tuple[Response, float]:
    t0 = time.monotonic()
    r = fn(*args, **kw)
    return r, time.monotonic() - t0


class Background:
    """A blocking request in a thread; `done_at` is when its answer arrived."""

    def __init__(self, method: str, url: str, **kw) -> None:
        self.response: Response | None = None
        self.error: BaseException | None = None
        self.done_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(method, url), kwargs=kw, daemon=True)
        self._thread.start()

    def _run(self, method: str, url: str, **kw) -> None:
        try:
            self.response = http(method, url, **kw)
        except BaseException as exc:  # reported by result()
            self.error = exc
        self.done_at = time.monotonic()

    def result(self, timeout: float) -> Response:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "request still running"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


def _wait_inflight(stack: Stack, n: int = 1) -> None:
    """The request reached the backend: the gateway holds it (a waiter for
    ingress, a served request for egress) and the backend is running it."""

    def inflight() -> bool:
        st = stack.status()
        return backend_stats(stack)["inflight"] >= n and st["pending"] + st["serving"] >= n

    wait_until(inflight, 10, what=f"{n} request(s) in flight")


# -- 404 no_matching_rule ----------------------------------------------------------


@pytest.mark.parametrize("way", ["ingress", "egress"])
def test_no_matching_rule_404(fstack, way):
    traceparent = f"00-{TRACE}-b7ad6b7169203331-01"
    r = raw_request(_port(fstack, way), "GET", "/hello", [("Host", "nowhere.test"), ("traceparent", traceparent)])
    body = assert_error(r, 404, "no_matching_rule", client_id="" if way == "ingress" else None)
    assert body["trace_id"] == TRACE
    fstack.wait_idle()


# -- 503 no_client_available ---------------------------------------------------------


def test_no_client_available_503_with_retry_after(fstack):
    r, took = _timed(http, "GET", f"{fstack.url}/nobody/hello")
    assert_error(r, 503, "no_client_available", client_id="")
    assert int(r.header("Retry-After")) >= 1
    assert took < 1.0
    fstack.wait_idle()


# -- 503 overloaded --------------------------------------------------------------------


def test_overloaded_503_immediately_when_the_stream_is_full(procs, tmp_path):
    # In-flight limit 2 per stream: the gateway's for ingress, the client's for egress.
    stack = _stack(procs, tmp_path, settings={"max_inflight_per_stream": 2}, client_extra=["--max-inflight", "2"])
    for way in ("ingress", "egress"):
        base = _base(stack, way)
        slow = [Background("GET", f"{base}/slow?ms=3000&token=s{i}") for i in range(2)]
        wait_until(lambda: backend_stats(stack)["inflight"] == 2, 10, what="two slow requests running")
        r, took = _timed(http, "GET", f"{base}/slow?ms=10&token=third")
        assert_error(r, 503, "overloaded", client_id="c1")
        assert int(r.header("Retry-After")) >= 1
        assert took < 1.0, f"{way}: overloaded answer took {took:.2f}s"
        assert [b.result(15).body for b in slow] == [b"s0", b"s1"]
        # Room again once they are done.
        assert http("GET", f"{base}/slow?ms=10&token=after").body == b"after"
        stack.wait_idle()


# -- 504 timeout --------------------------------------------------------------------------


@pytest.mark.parametrize("way,prefix", [
    ("ingress", "/short"),   # the gateway route's timeout
    ("ingress", "/strict"),  # the group rule's timeout, enforced by the client
    ("egress", "/short"),    # the gateway forward rule's timeout
])
def test_timeout_504_removes_the_waiter_and_resets_the_upstream_call(fstack, way, prefix):
    before = backend_stats(fstack)["cancelled"]
    r, took = _timed(http, "GET", f"{_base(fstack, way)}{prefix}/slow?ms=4000")
    body = assert_error(r, 504, "timeout", client_id="c1")
    assert fstack.backend_url.split("//")[1] not in body["message"], body
    assert 0.9 <= took < 3.0, f"504 after {took:.2f}s for a 1 s timeout"
    # The RESET reached whoever calls the backend: the call is cancelled long before its 4 s.
    wait_until(lambda: backend_stats(fstack)["cancelled"] == before + 1, 2.0, what="upstream call cancelled")
    assert backend_stats(fstack)["inflight"] == 0
    fstack.wait_idle()


async def _paced_upload(url: str, pieces: int, pause: float, stall_after: int | None = None) -> tuple[int, bytes, float]:
    """POST `pieces` of 64 KiB, one every `pause` s (or stop sending after
    `stall_after` of them); the status, body and seconds it took."""
    async def body():
        for i in range(pieces):
            if stall_after is not None and i == stall_after:
                await asyncio.sleep(30)
            yield b"u" * 65536
            await asyncio.sleep(pause)

    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40)) as s:
        try:
            async with s.post(url, data=body()) as r:
                return r.status, await r.read(), time.monotonic() - t0
        except aiohttp.ClientError:
            return -1, b"", time.monotonic() - t0


@pytest.mark.parametrize("way", ["ingress", "egress"])
def test_upload_longer_than_the_timeout_completes_while_it_progresses(fstack, way):
    """The response-head timeout (1 s on /short) counts from the end of the upload."""
    status, body, took = asyncio.run(_paced_upload(f"{_base(fstack, way)}/short/sink", 6, 0.4))
    assert status == 200, body[:300]
    assert took > 2.0
    assert json.loads(body)["size"] == 6 * 65536
    fstack.wait_idle()


@pytest.mark.parametrize("way", ["ingress", "egress"])
def test_stalled_upload_ends_with_504_after_the_timeout(fstack, way):
    status, body, took = asyncio.run(_paced_upload(f"{_base(fstack, way)}/short/sink", 6, 0.1, stall_after=2))
    # The 504 may race the caller's own write; either way the request ends a
    # timeout after the stall, not when the caller gives up.
    if status != -1:
        assert_error(Response(status, [("Content-Type", "application/json"), ("x-request-id", json.loads(body)["request_id"]),
                                       ("x-trace-id", json.loads(body)["trace_id"])], body), 504, "timeout")
    assert took < 5.0, took
    fstack.wait_idle()


# -- 502 tunnel_closed --------------------------------------------------------------------


def test_client_killed_mid_request_502_within_1s_and_traffic_resumes_after_restart(fstack):
    stack = fstack
    gateway_pid = stack.gateway.popen.pid
    pending = Background("GET", f"{stack.url}/slow?ms=8000")
    _wait_inflight(stack)
    killed_at = time.monotonic()
    signal_client(stack, "c1", signal.SIGKILL)
    r = pending.result(10)
    took = pending.done_at - killed_at
    assert_error(r, 502, "tunnel_closed", client_id="c1")
    assert took < 1.0, f"502 after {took:.2f}s"
    # The gateway noticed: no stream, no waiter.
    wait_until(lambda: stack.streams("g1") == 0, 5, what="stream dropped")
    r = http("GET", f"{stack.url}/hello")
    assert_error(r, 503, "no_client_available")
    stack.wait_idle()
    # A restarted client carries traffic again; the gateway was never restarted.
    stack.start_client("c1", extra=["--connections", "1"])
    assert http("GET", f"{stack.url}/hello").status == 200
    assert http("GET", f"{stack.local_url()}/hello").status == 200
    assert stack.gateway.popen.pid == gateway_pid and stack.gateway.alive()
    stack.wait_idle()


# -- 502 upstream_unavailable -------------------------------------------------------------


def _no_internal_address(stack: Stack, way: str, body: dict, upstream: str) -> None:
    """The caller's error body never shows the upstream's address; the log of whoever called
    it (the client for ingress, the gateway for egress) has it, with the request id."""
    address = upstream.split("//")[1]
    assert address not in body["message"] and address.split(":")[1] not in body["message"], body
    proc = stack.clients["c1"][0] if way == "ingress" else stack.gateway
    wait_until(lambda: any(body["request_id"] in line and address in line for line in proc.output().splitlines()),
               what="the upstream's address in the log", watch=proc)


@pytest.mark.parametrize("way", ["ingress", "egress"])
def test_dead_upstream_502_upstream_unavailable(fstack, way):
    for _ in range(2):  # also once the upstream is marked down by passive health
        r, took = _timed(http, "GET", f"{_base(fstack, way)}/dead/hello")
        body = assert_error(r, 502, "upstream_unavailable", client_id="c1")
        assert took < 3.0
        _no_internal_address(fstack, way, body, fstack.dead)
    # The live upstream still answers.
    assert http("GET", f"{_base(fstack, way)}/hello").status == 200
    fstack.wait_idle()


# -- user disconnects -----------------------------------------------------------------------


@pytest.mark.parametrize("way", ["ingress", "egress"])
def test_user_disconnect_cancels_the_upstream_call(fstack, way):
    before = backend_stats(fstack)["cancelled"]

    async def main():
        async with aiohttp.ClientSession() as s:
            task = asyncio.ensure_future(s.get(f"{_base(fstack, way)}/slow?ms=8000"))
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _wait_inflight, fstack)
            task.cancel()  # closes the connection: the user went away
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    wait_until(lambda: backend_stats(fstack)["cancelled"] == before + 1, 3.0, what="upstream call cancelled")
    assert backend_stats(fstack)["inflight"] == 0
    fstack.wait_idle()
    assert http("GET", f"{_base(fstack, way)}/hello").status == 200


@pytest.mark.parametrize("way", ["ingress", "egress"])
def test_user_disconnect_mid_download_leaves_nothing_behind(fstack, way):
    async def main():
        async with aiohttp.ClientSession() as s:
            r = await s.get(f"{_base(fstack, way)}/bytes/{1 << 30}")
            assert r.status == 200
            got = 0
            async for chunk in r.content.iter_chunked(1 << 16):
                got += len(chunk)
                if got >= 4 << 20:
                    break
            r.close()  # the user goes away in the middle of a 1 GiB body

    asyncio.run(main())
    fstack.wait_idle()
    assert http("GET", f"{_base(fstack, way)}/hello").status == 200


@pytest.mark.parametrize("way", ["ingress", "egress"])
def test_user_disconnect_mid_upload_leaves_nothing_behind(fstack, way):
    with socket.create_connection(("127.0.0.1", _port(fstack, way)), timeout=5) as sock:
        sock.sendall(b"POST /sink HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"u" * 65536
        for _ in range(16):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))

        def both_hops_busy() -> bool:
            st = fstack.status()
            cs = fstack.client_status("c1")
            return st["pending"] + st["serving"] >= 1 and cs["pending"] + cs["serving"] >= 1

        wait_until(both_hops_busy, 5, what="upload in flight on both hops")
        # Abort: RST instead of a polite close, with the body unfinished.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    fstack.wait_idle()
    assert http("GET", f"{_base(fstack, way)}/hello").status == 200


def test_client_killed_mid_download_cuts_the_body_at_once(fstack):
    stack = fstack

    async def main():
        async with aiohttp.ClientSession() as s:
            r = await s.get(f"{stack.url}/bytes/{1 << 30}")
            assert r.status == 200
            got = 0
            killed_at = None
            try:
                async for chunk in r.content.iter_chunked(1 << 16):
                    got += len(chunk)
                    if killed_at is None and got >= 4 << 20:
                        killed_at = time.monotonic()
                        signal_client(stack, "c1", signal.SIGKILL)
            except aiohttp.ClientPayloadError:
                pass
            return got, time.monotonic() - killed_at

    got, took = asyncio.run(main())
    # The head was out: a cut connection (not a clean end) is the only honest signal.
    assert got < 1 << 30
    assert took < 1.0, f"body cut {took:.2f}s after the kill"
    stack.wait_idle()
    stack.start_client("c1", extra=["--connections", "1"])
    assert http("GET", f"{stack.url}/hello").status == 200
    stack.wait_idle()


# -- heartbeat ----------------------------------------------------------------------------------


def test_silent_client_is_dropped_after_three_heartbeats_and_its_request_fails(fstack):
    stack = fstack
    pending = Background("GET", f"{stack.url}/slow?ms=15000")
    _wait_inflight(stack)
    stopped_at = time.monotonic()
    signal_client(stack, "c1", signal.SIGSTOP)
    try:
        r = pending.result(15)
        took = pending.done_at - stopped_at
        assert_error(r, 502, "tunnel_closed", client_id="c1")
        # heartbeat_interval is 1 s: dropped after about 3 (not at once, not never).
        assert 2.0 <= took < 6.0, f"dropped after {took:.2f}s"
        wait_until(lambda: "peer missed 3 heartbeats" in stack.gateway.output(), 2, what="heartbeat drop logged")
        assert stack.streams("g1") == 0
        assert_error(http("GET", f"{stack.url}/hello"), 503, "no_client_available")
    finally:
        signal_client(stack, "c1", signal.SIGCONT)
    # Awake again, the client reconnects by itself.
    wait_until(lambda: stack.streams("g1") == 1 and stack._client_connected("c1"), 15, what="client reconnected",
               watch=(stack.gateway, stack.clients["c1"][0]))
    assert http("GET", f"{stack.url}/hello").status == 200
    stack.wait_idle()
