"""Tunnel admission: how many new tunnel connections and failed HELLOs a
source address and a group get, before any token is compared. No I/O: the
tunnel endpoint asks, refuses and logs; the clock is handed in.

Each bound is a token bucket of N a minute (a burst of N, then N a minute),
counted per worker. A source that failed too many HELLOs is refused before
it may send another: a token guesser gets a few guesses a minute.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

__all__ = ["Admission", "Buckets", "source_address", "ADMISSION_REASONS"]

WINDOW = 60.0
# Most keys a table of buckets remembers; the least recently seen go first (a
# source that has not been seen for a while has a full bucket anyway).
MAX_KEYS = 10000

# Why a connection was refused (a metric label): a bounded set, never a group name.
ADMISSION_REASONS = ("source_connects", "source_failed_hellos", "group_connects", "group_failed_hellos",
                     "group_streams")


class Buckets:
    """Token buckets by key: `per_minute` tokens, refilled evenly over a minute."""

    __slots__ = ("per_minute", "_table", "_clock")

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.per_minute = per_minute
        self._table: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._clock = clock

    def _level(self, key: Hashable) -> float:
        entry = self._table.get(key)
        if entry is None:
            return float(self.per_minute)
        tokens, at = entry
        return min(float(self.per_minute), tokens + (self._clock() - at) * self.per_minute / WINDOW)

    def available(self, key: Hashable) -> bool:
        """At least one token left (nothing taken)."""
        return self._level(key) >= 1.0

    def take(self, key: Hashable) -> bool:
        """Take one token; False (and nothing taken) when there is none."""
        level = self._level(key)
        if level < 1.0:
            return False
        self._table[key] = (level - 1.0, self._clock())
        self._table.move_to_end(key)
        while len(self._table) > MAX_KEYS:
            self._table.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._table)


class Admission:
    """The bounds of one worker's tunnel port, from the `[gateway]` settings
    tunnel_connects_per_source, tunnel_failed_hellos_per_source,
    tunnel_connects_per_group, tunnel_failed_hellos_per_group and
    tunnel_max_streams_per_group. Each check returns None (go on) or the
    reason of a refusal (one of ADMISSION_REASONS)."""

    def __init__(self, *, connects_per_source: int, failed_hellos_per_source: int, connects_per_group: int,
                 failed_hellos_per_group: int, max_streams_per_group: int,
                 clock: Callable[[], float]) -> None:
        self.source_connects = Buckets(connects_per_source, clock)
        self.source_failures = Buckets(failed_hellos_per_source, clock)
        self.group_connects = Buckets(connects_per_group, clock)
        self.group_failures = Buckets(failed_hellos_per_group, clock)
        self.max_streams_per_group = max_streams_per_group

    def connect(self, source: str) -> str | None:
        """A new tunnel connection from `source`, before its HELLO is read."""
        if not self.source_failures.available(source):
            return "source_failed_hellos"
        if not self.source_connects.take(source):
            return "source_connects"
        return None

    def hello(self, group: str, streams: int) -> str | None:
        """A HELLO for configured `group` (holding `streams` streams here), before its credentials are checked."""
        if not self.group_failures.available(group):
            return "group_failed_hellos"
        if streams >= self.max_streams_per_group:
            return "group_streams"
        if not self.group_connects.take(group):
            return "group_connects"
        return None

    def failed(self, source: str, group: str | None) -> None:
        """A HELLO from `source` was refused; `group` when it names a configured one."""
        self.source_failures.take(source)
        if group is not None:
            self.group_failures.take(group)


def source_address(peer: str) -> str:
    """The address of a gRPC peer string ("ipv4:10.0.0.1:5000", "ipv6:[::1]:5000",
    "unix:/path"), without the port: what admission counts by."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer
