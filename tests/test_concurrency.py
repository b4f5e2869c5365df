"""The seed's promise: requests on one tunnel run concurrently."""
from __future__ import annotations

import asyncio
import random
import time

import aiohttp


def test_three_slow_requests_overlap(stack):
    async def main():
        async with aiohttp.ClientSession() as s:
            async def one(ms: int):
                async with s.get(f"{stack.url}/slow?ms={ms}&token=t{ms}") as r:
                    return r.status, await r.text()

            t0 = time.monotonic()
            results = await asyncio.gather(one(5000), one(2000), one(1000))
            return time.monotonic() - t0, results

    elapsed, results = asyncio.run(main())
    assert results == [(200, "t5000"), (200, "t2000"), (200, "t1000")]
    assert elapsed < 7.0, f"took {elapsed:.2f}s; sequential would be 8s"
    stack.wait_idle()


def test_thousand_concurrent_requests_each_get_their_own_answer(stack):
    async def main():
        conn = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(connector=conn) as s:
            async def one(i: int):
                token = f"tok-{i}-{random.getrandbits(32):x}"
                async with s.get(f"{stack.url}/slow?ms={random.randint(0, 300)}&token={token}") as r:
                    return token, r.status, await r.text(), r.headers["x-request-id"]

            return await asyncio.gather(*(one(i) for i in range(1000)))

    results = asyncio.run(main())
    assert all(status == 200 for _, status, _, _ in results)
    assert all(token == body for token, _, body, _ in results)
    assert len({rid for *_, rid in results}) == 1000
    stack.wait_idle()
