"""Choosing the client stream for a request. Pure logic, no I/O.

Candidates are this worker's streams of the group and, through the shard
table, other workers' streams. A stream whose client reports the request's
upstream unhealthy is skipped while a healthy one exists. Streams this worker
owns are preferred; `consistent_hash` first picks the client by rendezvous
hashing of the key (so when a client goes, only its keys move), then one of
that client's streams.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable

from gateway.balance import pick_least, prefer_filling

__all__ = ["Candidate", "Balancer", "rendezvous"]


@dataclass(slots=True)
class Candidate:
    client_id: str
    worker: int
    inflight: int
    unhealthy: frozenset[str] = frozenset()
    stream: Any = None  # the TunnelStream when this worker owns it


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
        preferred = [c for c in candidates if (c.stream is None) == prefer_remote]
        pool = preferred or candidates
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

