"""Streaming responses: server-sent events pass chunk by chunk, long streams
outlive the head timeout, silence is bounded by the idle timeout."""
from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.harness import Stack


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
