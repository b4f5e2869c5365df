"""Picking one of several: upstream servers and tunnel streams. Pure logic."""
from __future__ import annotations

import itertools
import random
from typing import Sequence, TypeVar

__all__ = ["ServerPool", "UPSTREAM_POLICIES", "STREAM_POLICIES", "pick_least"]

UPSTREAM_POLICIES = ("round_robin", "random", "least_conn")
STREAM_POLICIES = ("round_robin", "least_inflight", "consistent_hash")

T = TypeVar("T")


class ServerPool:
    """The servers of one upstream and the policy that picks among them."""

    __slots__ = ("servers", "policy", "_rr", "_active")

    def __init__(self, servers: Sequence[str], policy: str = "round_robin") -> None:
        if policy not in UPSTREAM_POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        self.servers = tuple(servers)
        self.policy = policy
        self._rr = itertools.cycle(range(len(self.servers)))
        self._active = dict.fromkeys(self.servers, 0)

    def acquire(self) -> str:
        if self.policy == "random":
            server = random.choice(self.servers)
        elif self.policy == "least_conn":
            server = pick_least(self.servers, self._active.__getitem__)
        else:
            server = self.servers[next(self._rr)]
        self._active[server] += 1
        return server

    def release(self, server: str) -> None:
        self._active[server] -= 1

    def active(self, server: str) -> int:
        return self._active[server]


def pick_least(items: Sequence[T], load) -> T:
    """The item with the least load; ties go to the earliest."""
    best = items[0]
    best_load = load(best)
    for item in items[1:]:
        n = load(item)
        if n < best_load:
            best, best_load = item, n
    return best
