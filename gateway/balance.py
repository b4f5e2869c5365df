"""Picking one of several: upstream servers and tunnel streams. Pure logic, no I/O.

`ServerPool` picks a server of an upstream by its policy and health.
`Balancer` picks the client stream for a request among candidates: this
worker's streams of the group and, through the shard table, other workers'
(of this node, and in a fleet of other nodes). A stream whose client reports
the request's upstream unhealthy is skipped while a healthy one exists. Streams
this worker owns are preferred, then other workers' of this node, then other
nodes' (among those, the group's policy);
`consistent_hash` first picks the client by rendezvous hashing of the key (so
when a client goes, only its keys move), then one of that client's streams.
"""
from __future__ import annotations

import hashlib
import itertools
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

__all__ = ["ServerPool", "UPSTREAM_POLICIES", "STREAM_POLICIES", "pick_least", "prefer_filling",
           "Candidate", "Balancer", "rendezvous"]

UPSTREAM_POLICIES = ("round_robin", "random", "least_conn")
STREAM_POLICIES = ("round_robin", "least_inflight", "consistent_hash")

T = TypeVar("T")


class ServerPool:
    """The servers of one upstream, their health, and the policy that picks
    among the healthy ones (among all of them when none is healthy).

    Passive health: `max_fails` failures in a row take a server out for
    `fail_timeout` seconds. Active health: `set_health` from a checker."""

    __slots__ = ("servers", "policy", "max_fails", "fail_timeout", "_rr", "_active", "_fails", "_down_until",
                 "_check_down")

    def __init__(self, servers: Sequence[str], policy: str = "round_robin", *, max_fails: int = 3,
                 fail_timeout: float = 10.0) -> None:
        if policy not in UPSTREAM_POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        self.servers = tuple(servers)
        self.policy = policy
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self._rr = itertools.count()
        self._active = dict.fromkeys(self.servers, 0)
        self._fails = dict.fromkeys(self.servers, 0)
        self._down_until = dict.fromkeys(self.servers, 0.0)
        self._check_down: set[str] = set()

    def is_healthy(self, server: str, now: float | None = None) -> bool:
        if server in self._check_down:
            return False
        return self._down_until[server] <= (time.monotonic() if now is None else now)

    def healthy_servers(self) -> list[str]:
        now = time.monotonic()
        return [s for s in self.servers if self.is_healthy(s, now)]

    @property
    def healthy(self) -> bool:
        return bool(self.healthy_servers())

    def report(self, server: str, ok: bool) -> None:
        """Passive health: the outcome of a real request."""
        if ok:
            self._fails[server] = 0
            return
        self._fails[server] += 1
        if self.max_fails and self._fails[server] >= self.max_fails:
            self._down_until[server] = time.monotonic() + self.fail_timeout

    def set_health(self, server: str, ok: bool) -> None:
        """Active health: the outcome of a health check."""
        if ok:
            self._check_down.discard(server)
            self._fails[server] = 0
            self._down_until[server] = 0.0
        else:
            self._check_down.add(server)

    def acquire(self) -> str:
        # One server is the answer whatever its health (the usual upstream).
        servers = self.servers if len(self.servers) == 1 else self.healthy_servers() or self.servers
        if self.policy == "random":
            server = random.choice(servers)
        elif self.policy == "least_conn":
            server = pick_least(servers, self._active.__getitem__)
        else:
            server = servers[next(self._rr) % len(servers)]
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


def prefer_filling(items: list[T], stream_of: Callable[[T], Any]) -> T | None:
    """The first item whose stream is filling a gRPC message with room left, if any.
    Sending a request there lets requests that arrive in the same loop turn
    share one gRPC message instead of alternating between connections (at
    concurrency 64: 10 frames a message instead of 3, and about a fifth less
    CPU a request on both ends)."""
    for item in items:
        if getattr(stream_of(item), "filling_batch", False):
            return item
    return None


@dataclass(slots=True)
class Candidate:
    client_id: str
    worker: int
    inflight: int
    unhealthy: frozenset[str] = frozenset()
    stream: Any = None  # the TunnelStream when this worker owns it
    node: str = ""  # the node holding it when that is another node (a fleet), else ""


def _score(client_id: str, key: str) -> bytes:
    return hashlib.blake2b(f"{client_id}\0{key}".encode(), digest_size=8).digest()


def rendezvous(key: str, client_ids: Iterable[str]) -> str:
    """The client with the highest hash for `key` (highest random weight)."""
    return max(client_ids, key=lambda c: (_score(c, key), c))


class Balancer:
    def __init__(self) -> None:
        self._rr: dict[str, itertools.count] = {}

    def _next(self, group: str, n: int) -> int:
        counter = self._rr.get(group)
        if counter is None:
            counter = self._rr[group] = itertools.count()
        return next(counter) % n

    def pick(self, group: str, policy: str, candidates: list[Candidate], *, upstream: str | None = None,
             key: str | None = None, prefer_remote: bool = False) -> Candidate | None:
        """`prefer_remote` turns the local preference around (benchmarks of the router hop)."""
        if not candidates:
            return None
        if upstream is not None:
            healthy = [c for c in candidates if upstream not in c.unhealthy]
            if healthy:
                candidates = healthy
        if policy == "consistent_hash" and key is not None:
            winner = rendezvous(key, {c.client_id for c in candidates})
            candidates = [c for c in candidates if c.client_id == winner]
        # The nearest that has one: this worker's streams, another worker's of this node, another
        # node's; with `prefer_remote` through the router first (another worker, another node, then ours).
        if prefer_remote:
            pool = ([c for c in candidates if c.stream is None and not c.node]
                    or [c for c in candidates if c.node] or candidates)
        else:
            pool = [c for c in candidates if c.stream is not None] or [c for c in candidates if not c.node] or candidates
        # The policy chooses a client; then one of that client's streams.
        if policy == "least_inflight":
            load: dict[str, int] = {}
            for c in pool:
                load[c.client_id] = load.get(c.client_id, 0) + c.inflight
            client_id = pick_least(list(load), load.__getitem__)
        else:
            clients = list(dict.fromkeys(c.client_id for c in pool))
            client_id = clients[self._next(group, len(clients))]
        mine = [c for c in pool if c.client_id == client_id]
        if len(mine) == 1:
            return mine[0]
        # Several connections of the client: the one already filling its next
        # gRPC message, else the least busy (least_inflight) or each in turn.
        chosen = prefer_filling(mine, lambda c: c.stream)
        if chosen is not None:
            return chosen
        if policy == "least_inflight":
            return pick_least(mine, lambda c: c.inflight)
        return mine[self._next(f"{group}\0{client_id}", len(mine))]

