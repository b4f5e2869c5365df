"""The shard table: which worker holds which client streams, by group.

Behind a small interface so a store shared by several gateway hosts (Redis
with a lease per host) can replace the in-process implementation later.
"""
from __future__ import annotations

import time
from typing import Any, Protocol

__all__ = ["ShardTable", "InProcessShardTable"]


class ShardTable(Protocol):
    def update(self, worker: str, info: dict[str, Any], now: float) -> bool: ...
    def remove(self, worker: str) -> bool: ...
    def expire(self, now: float, max_age: float) -> list[str]: ...
    def snapshot(self) -> dict[str, dict[str, Any]]: ...


class InProcessShardTable:
    """The table for one host, kept by the router process."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, Any]] = {}
        self._seen: dict[str, float] = {}

    def update(self, worker: str, info: dict[str, Any], now: float | None = None) -> bool:
        """Store a worker's announce; True when its streams changed."""
        now = time.monotonic() if now is None else now
        old = self._rows.get(worker)
        self._rows[worker] = info
        self._seen[worker] = now
        return old is None or old.get("streams") != info.get("streams")

    def remove(self, worker: str) -> bool:
        self._seen.pop(worker, None)
        return self._rows.pop(worker, None) is not None

    def expire(self, now: float, max_age: float) -> list[str]:
        """Drop workers not heard from in `max_age` seconds; returns them."""
        gone = [w for w, t in self._seen.items() if now - t > max_age]
        for w in gone:
            self.remove(w)
        return gone

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return dict(self._rows)
