"""Which of a gateway's workers the client's connections sit on: pure decisions, no I/O.

A gateway runs a worker per core, and the kernel hands each new tunnel
connection to one of them at random (SO_REUSEPORT). A request that enters a
worker holding no stream of its group crosses to a worker that does, which
costs a hop through the router (docs/performance.md: a fifth fewer requests/s,
more CPU a request). So two connections of one client on one worker, while
another of that gateway's workers holds none of them, waste a connection: the
agent moves one of them, to the same address, make-before-break, and the kernel
places the new connection afresh. A move that lands on a worker already held
changes nothing; after `TRIES_PER_WORKER` x workers moves in a row that did not
spread them further it stops trying, until its connections change otherwise (a
reconnect, another gateway).

The gateway says which worker answered, how many it runs and which gateway
process group it is (WELCOME `worker`, `workers`, `instance`): two gateways
behind one address are two gateways, not one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

__all__ = ["Seat", "WorkerSpread", "TRIES_PER_WORKER"]

# Moves in a row that may fail to reach a new worker, per worker of the gateway,
# before the spread stops trying: with W workers and one left to reach, each move
# reaches it with chance 1/W, so 8 x W of them all miss it 0.03 % of the time (e^-8);
# where the kernel cannot spread them (a balancer pinning by address), 8 x W moves
# at one a second is all it costs.
TRIES_PER_WORKER = 8


@dataclass(frozen=True)
class Seat:
    """Where one connection's stream is served."""

    node: str  # the address it dialled
    gateway: str  # the gateway process group that answered (WELCOME instance)
    worker: str  # which of its workers
    workers: int  # how many it runs


def _by_gateway(seats: Mapping[int, Seat | None]) -> dict[tuple[str, str], list[tuple[int, Seat]]]:
    out: dict[tuple[str, str], list[tuple[int, Seat]]] = {}
    for index, seat in sorted(seats.items()):
        if seat is not None:
            out.setdefault((seat.node, seat.gateway), []).append((index, seat))
    return out


def workers_held(seats: Mapping[int, Seat | None]) -> int:
    """How many distinct workers (of every gateway) hold one of the connections."""
    return len({(s.node, s.gateway, s.worker) for s in seats.values() if s is not None})


def crowded(seats: Mapping[int, Seat | None]) -> int | None:
    """A connection to move: one that shares its worker with another of ours while
    that gateway has a worker none of ours is on; None when there is none."""
    for members in _by_gateway(seats).values():
        workers = max(seat.workers for _, seat in members)
        on: dict[str, list[int]] = {}
        for index, seat in members:
            on.setdefault(seat.worker, []).append(index)
        if len(on) < min(workers, len(members)):
            # From the most crowded worker, its last connection (the lowest indexes stay put).
            return max(on.values(), key=len)[-1]
    return None


class WorkerSpread:
    """The next move that spreads the connections over the workers, and when to stop trying."""

    def __init__(self, tries_per_worker: int = TRIES_PER_WORKER) -> None:
        self.tries_per_worker = tries_per_worker
        self.misses = 0  # moves in a row that reached no new worker
        self.given_up = False
        self._held_before: int | None = None  # workers held when the last move was planned
        self._placement: dict[int, tuple[str, str]] = {}  # where the connections were then (node, gateway)
        self._reconnects = 0

    def plan(self, seats: Mapping[int, Seat | None], reconnects: int = 0) -> int | None:
        """The connection to move now, or None (spread, nothing to gain, or given up).
        `reconnects`: how often the connections were opened again, moves aside."""
        placement = {i: (s.node, s.gateway) for i, s in seats.items() if s is not None}
        if placement != self._placement or reconnects != self._reconnects:  # start afresh
            self.misses, self.given_up, self._held_before = 0, False, None
            self._reconnects = reconnects
        held = workers_held(seats)
        if self._held_before is not None:  # the last move's outcome
            self.misses = 0 if held > self._held_before else self.misses + 1
            self._held_before = None
        index = crowded(seats)
        if index is None:
            self.misses = 0
            return None
        workers = max(1, seats[index].workers)  # type: ignore[union-attr]
        if self.given_up or self.misses >= self.tries_per_worker * workers:
            self.given_up = True
            return None
        self._held_before = held
        self._placement = placement
        return index
