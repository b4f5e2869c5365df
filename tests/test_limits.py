"""Limits and hygiene at the entry: 413, 429, 431, 503 and 400; the gateway keeps serving."""
from __future__ import annotations

import asyncio
import signal
import socket

import aiohttp
import pytest

from tests.harness import Stack, http, to_toml, wait_until


def _limited_doc(stack: Stack) -> dict:
    # One worker: in-flight limits are per worker (rates are split among workers).
    doc = stack.gateway_doc(settings={"max_header_bytes": 4096, "max_body_bytes": 1 << 20, "workers": 1})
    doc["groups"]["g1"]["max_body_bytes"] = 64 * 1024
    doc["routes"] = [
        {"name": "rated", "path_prefix": "/rated", "group": "g1", "strip_prefix": True, "rate": 2.0, "burst": 2.0},
        {"name": "narrow", "path_prefix": "/narrow", "group": "g1", "strip_prefix": True, "max_inflight": 2},
        {"name": "small", "path_prefix": "/small", "group": "g1", "strip_prefix": True, "max_body_bytes": 1024},
        {"name": "all", "path_prefix": "/", "group": "g1"},
    ]
    return doc


@pytest.fixture
def limited(procs, tmp_path) -> Stack:
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    stack.start_gateway(_limited_doc(stack))
    stack.start_client("c1")
    return stack


def _healthy(stack: Stack) -> None:
    assert http("GET", f"http://127.0.0.1:{stack.admin_port}/healthz").status == 200
    assert http("GET", f"{stack.url}/hello").status == 200


def _raw(stack: Stack, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=5) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return out


def test_body_limits_per_rule_and_group(limited):
    r = http("POST", f"{limited.url}/small/sink", b"x" * 2048)
    assert r.status == 413 and r.json()["error"] == "body_too_large"
    r = http("POST", f"{limited.url}/sink", b"x" * (100 * 1024))  # over the group's 64 KiB
    assert r.status == 413
    assert http("POST", f"{limited.url}/sink", b"x" * (60 * 1024)).json()["size"] == 60 * 1024

    def chunks():
        for _ in range(100):
            yield b"y" * 1024

    # A chunked body is counted as it streams.
    r = http("POST", f"{limited.url}/sink", chunks())
    assert r.status == 413
    _healthy(limited)
    limited.wait_idle()


def test_reload_gives_a_route_its_new_limits(limited):
    # The entry works out a route's limits once per config: a reload must bring the new ones.
    assert http("POST", f"{limited.url}/small/sink", b"x" * 2048).status == 413
    for _ in range(3):
        http("GET", f"{limited.url}/rated/hello")
    assert http("GET", f"{limited.url}/rated/hello").status == 429
    doc = _limited_doc(limited)
    doc["routes"][0].update(rate=1000.0, burst=1000.0)
    doc["routes"][2]["max_body_bytes"] = 4096
    doc["groups"]["g1"]["max_body_bytes"] = 16 * 1024
    limited.gateway_config.write_text(to_toml(doc))
    limited.gateway.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: http("POST", f"{limited.url}/small/sink", b"x" * 2048).status == 200, 10,
               what="the route's new body limit")
    assert all(http("GET", f"{limited.url}/rated/hello").status == 200 for _ in range(5))
    assert http("POST", f"{limited.url}/sink", b"x" * (20 * 1024)).status == 413  # the group's, lowered
    _healthy(limited)


def test_rate_limit_answers_429_with_retry_after(limited):
    statuses = [http("GET", f"{limited.url}/rated/hello") for _ in range(8)]
    codes = [r.status for r in statuses]
    assert codes[:2] == [200, 200] and 429 in codes
    limited_one = next(r for r in statuses if r.status == 429)
    assert limited_one.json()["error"] == "rate_limited" and int(limited_one.header("Retry-After")) >= 1
    _healthy(limited)


def test_rule_inflight_limit_answers_503_at_once(limited):
    async def main():
        async with aiohttp.ClientSession() as s:
            slow = [asyncio.ensure_future(s.get(f"{limited.url}/narrow/slow?ms=1500")) for _ in range(2)]
            await asyncio.sleep(0.5)
            t0 = asyncio.get_running_loop().time()
            async with s.get(f"{limited.url}/narrow/hello") as r:
                third = r.status, (await r.json())["error"], asyncio.get_running_loop().time() - t0
            done = [await t for t in slow]
            return third, [d.status for d in done]

    (status, error, took), slow = asyncio.run(main())
    assert (status, error) == (503, "overloaded") and took < 0.5
    assert slow == [200, 200]
    _healthy(limited)


def test_oversize_head_431_leaves_the_entry_serving(limited):
    r = http("GET", f"{limited.url}/hello", headers={"X-Big": "b" * 5000})
    assert r.status == 431 and r.json()["error"] == "headers_too_large"
    _healthy(limited)


@pytest.mark.parametrize("raw", [
    b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Bad: a\rb\r\n\r\n",              # bare CR in a value
    b"GET /hello HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",               # invalid header name
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",             # absurd URL
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage-not-http\r\n\r\n",  # TLS hello / garbage
])
def test_malformed_requests_get_400_and_the_gateway_keeps_serving(limited, raw):
    out = _raw(limited, raw)
    status = out.split(b"\r\n", 1)[0]
    assert status[:9] in (b"HTTP/1.0 ", b"HTTP/1.1 ") and status[9:12] in (b"400", b"431"), out[:200]
    _healthy(limited)
    if status[9:12] == b"400":
        # One log line names the problem (no traceback).
        assert "bad request rejected" in limited.gateway.output()
