"""Streaming responses: server-sent events pass chunk by chunk, long streams
outlive the head timeout, silence is bounded by the idle timeout."""
from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.harness import Stack, http


async def _events(url: str) -> list[tuple[float, float]]:
    """(sent, received) of every event."""
    out = []
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            buf = b""
            async for chunk in r.content.iter_any():
                now = time.time()
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        if line.startswith(b"data: "):
                            out.append((float(line[6:]), now))
    return out


def _stack(procs, tmp_path, **route) -> Stack:
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    stack.start_gateway(routes=[{"path_prefix": "/", "group": "g1", **route}])
    stack.start_client("c1")
    return stack


def test_sse_events_arrive_as_they_are_sent(procs, tmp_path):
    stack = _stack(procs, tmp_path, timeout=10.0)
    events = asyncio.run(_events(f"{stack.url}/sse?n=20&ms=100"))
    assert len(events) == 20
    first_sent, first_seen = events[0]
    assert first_seen - first_sent < 0.3, f"first event took {first_seen - first_sent:.3f}s"
    # Long before the stream ended.
    assert events[-1][1] - first_seen > 1.5
    assert max(seen - sent for sent, seen in events) < 0.5
    stack.wait_idle()


def test_long_stream_outlives_the_head_timeout_and_egress_streams_too(procs, tmp_path):
    stack = _stack(procs, tmp_path, timeout=1.0)
    events = asyncio.run(_events(f"{stack.url}/sse?n=25&ms=100"))  # 2.5 s, route timeout 1 s
    assert len(events) == 25
    egress = asyncio.run(_events(f"{stack.local_url()}/sse?n=10&ms=100"))
    assert len(egress) == 10 and egress[0][1] - egress[0][0] < 0.3
    stack.wait_idle()


def test_idle_timeout_cuts_a_silent_stream(procs, tmp_path):
    stack = _stack(procs, tmp_path, timeout=5.0, idle_timeout=0.5)

    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{stack.url}/sse?n=3&ms=2000") as r:
                assert r.status == 200
                got = b""
                t0 = time.monotonic()
                try:
                    async for chunk in r.content.iter_any():
                        got += chunk
                except aiohttp.ClientPayloadError:
                    pass
                return got.count(b"data: "), time.monotonic() - t0

    events, took = asyncio.run(main())
    assert events == 1 and took < 1.8
    stack.wait_idle()


async def _head_and_body_times(url: str) -> tuple[float, float, int]:
    """Seconds from the request to its head, and to the end of its body; the body's size."""
    start = time.monotonic()
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 200
            head = time.monotonic() - start
            body = await r.read()
            return head, time.monotonic() - start, len(body)


def test_a_small_body_sent_after_its_head_goes_with_it_a_large_one_streams(procs, tmp_path):
    """An upstream that writes its head and then its body (aiohttp's StreamResponse): a small
    body of a declared length that follows at once is waited for, so head and body cross the
    tunnel in one message; one that takes longer, or a large one, has its head go on at once
    (a route timeout shorter than the pause must not end the request), both ways."""
    stack = _stack(procs, tmp_path, timeout=1.0)
    before = stack.client_status()
    n = 12
    for _ in range(n):
        r = http("GET", f"{stack.url}/bytes/100?pause_ms=3")
        assert r.status == 200 and len(r.body) == 100
    after = stack.client_status()
    answers = after["batches_out"] - before["batches_out"]
    assert after["frames_out"] - before["frames_out"] >= 2 * n
    assert answers <= n + 2, f"{answers} tunnel messages for {n} answers: heads went alone"
    for base in (stack.url, stack.local_url()):
        head, end, size = asyncio.run(_head_and_body_times(f"{base}/bytes/100?pause_ms=1500"))
        assert size == 100 and head < 0.5 and end >= 1.4, (base, head, end)
        head, end, size = asyncio.run(_head_and_body_times(f"{base}/bytes/200000?pause_ms=800"))
        assert size == 200000 and head < 0.5 and end >= 0.7, (base, head, end)
    stack.wait_idle()
