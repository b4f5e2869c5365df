"""A fleet's rollout book in Redis (key PREFIX:rollouts, JSON, no expiry: it
outlives every node). The deciding node's worker 0 writes it through its router
(`put`, only over an older book: a revision never goes back, so a node that
comes back from a partition with a stale book cannot overwrite the fleet's);
every router reads it (`on_book`) and hands it to its workers. Polled every
POLL seconds rather than subscribed: a book changes a few times a rollout.
Runs in the router's fleet thread (gateway/router/fleet.py)."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.exposure import mask_url

__all__ = ["RolloutStore", "POLL"]

log = logging.getLogger("gateway.router")

POLL = 0.5  # seconds between two reads of the book

# SET the book unless the one there has a higher revision; 1 when written.
_PUT_NEWER = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, book = pcall(cjson.decode, current)
  if ok and type(book) == 'table' and tonumber(book['revision']) and tonumber(book['revision']) > tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


class RolloutStore:
    def __init__(self, url: str, prefix: str, on_book: Callable[[bytes], None], timeout: float = 1.0) -> None:
        self.key = f"{prefix}:rollouts"
        self.on_book = on_book
        self.where = mask_url(url)
        self._redis: Redis = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                            retry=Retry(NoBackoff(), 0))
        self._last: bytes | None = None
        self._read_once = False
        self._failing = ""
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="rollout-store")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            async with asyncio.timeout(1.0):
                await self._redis.aclose()
        except (RedisError, OSError, TimeoutError):
            pass

    async def put(self, raw: bytes, revision: int) -> None:
        """Write the book `raw` (of `revision`) unless Redis holds a newer one."""
        try:
            written = await self._redis.eval(_PUT_NEWER, 1, self.key, raw, revision)
            self._ok()
        except (RedisError, OSError) as exc:
            self._failed(exc, "not written")
            return
        if not written:
            log.info("rollout book not written: the fleet's is newer", extra={"revision": revision})

    async def _watch(self) -> None:
        while True:
            try:
                raw = await self._redis.get(self.key)
                self._ok()
                # The first read is told even when there is none: the workers wait for it.
                if not self._read_once or raw != self._last:
                    self._read_once, self._last = True, raw
                    self.on_book(raw or b"")
            except (RedisError, OSError) as exc:
                self._failed(exc, "not read")
            await asyncio.sleep(POLL)

    def _ok(self) -> None:
        if self._failing:
            log.info("rollout book reachable again", extra={"redis": self.where})
        self._failing = ""

    def _failed(self, exc: BaseException, what: str) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if not self._failing:  # one line an outage
            log.warning("rollout book %s: Redis failed: %s", what, text, extra={"redis": self.where})
        self._failing = text
