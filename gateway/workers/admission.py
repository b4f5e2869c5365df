"""Tunnel admission: how many new tunnel connections and failed HELLOs a
source address gets, and how many connections and streams an authenticated
group gets. No I/O: the tunnel endpoint asks, refuses and logs; the clock is
handed in.

Each bound is a token bucket of N a minute (a burst of N, then N a minute),
counted per worker. Nothing an unauthenticated peer does is charged to a
group alone: else anyone could lock a tenant out by naming it in HELLOs with
wrong tokens. Failed HELLOs are counted per source address and per (group
named, source address), so a token guesser gets a few guesses a minute and
only its own address pays for them.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable, Hashable

__all__ = ["Admission", "Buckets", "source_address", "ADMISSION_REASONS"]

WINDOW = 60.0
# Most keys a table of buckets remembers; the least recently taken go first (a
# source that has not been seen for a while has a full bucket anyway). Buckets
# that have refilled are forgotten sooner: a missing entry reads as full too.
MAX_KEYS = 10000

# Why a connection was refused (a metric label): a bounded set, never a group name.
# `group_failed_hellos` counts the failures of one source naming one group.
ADMISSION_REASONS = ("source_connects", "source_failed_hellos", "group_connects", "group_failed_hellos",
                     "group_streams")


class Buckets:
    """Token buckets by key: `per_minute` tokens, refilled evenly over a minute."""

    __slots__ = ("per_minute", "_table", "_clock")

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.per_minute = per_minute
        self._table: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._clock = clock

    def _level(self, key: Hashable, now: float) -> float:
        entry = self._table.get(key)
        if entry is None:
            return float(self.per_minute)
        tokens, at = entry
        return min(float(self.per_minute), tokens + (now - at) * self.per_minute / WINDOW)

    def available(self, key: Hashable) -> bool:
        """At least one token left (nothing taken)."""
        return self._level(key, self._clock()) >= 1.0

    def take(self, key: Hashable) -> bool:
        """Take one token; False (and nothing taken) when there is none."""
        now = self._clock()
        level = self._level(key, now)
        if level < 1.0:
            return False
        self._table[key] = (level - 1.0, now)
        self._table.move_to_end(key)
        # Oldest first: drop what has refilled (so the table holds about a minute
        # of keys, however many sources came and went) and whatever is past MAX_KEYS.
        while len(self._table) > MAX_KEYS or self._level(next(iter(self._table)), now) >= self.per_minute:
            self._table.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._table)


def _named(group: str, source: str) -> tuple[bytes, str]:
    """The key of a group name as a HELLO spelled it, from one source: a digest,
    because the name is the peer's (up to a whole message) and need not exist."""
    return hashlib.blake2b(group.encode(errors="surrogatepass"), digest_size=16).digest(), source


class Admission:
    """The bounds of one worker's tunnel port, from the `[gateway]` settings
    tunnel_connects_per_source, tunnel_failed_hellos_per_source,
    tunnel_connects_per_group, tunnel_failed_hellos_per_group (per group named
    and source address) and tunnel_max_streams_per_group. Each check returns
    None (go on) or the reason of a refusal (one of ADMISSION_REASONS).

    The endpoint asks, in this order: `connect` (the source, before reading
    anything), `hello` (the source and the group it names, before any
    credential is checked), then, for a HELLO whose credentials are valid only,
    `admit` (the group); `failed` counts a refused HELLO."""

    def __init__(self, *, connects_per_source: int, failed_hellos_per_source: int, connects_per_group: int,
                 failed_hellos_per_group: int, max_streams_per_group: int,
                 clock: Callable[[], float]) -> None:
        self.source_connects = Buckets(connects_per_source, clock)
        self.source_failures = Buckets(failed_hellos_per_source, clock)
        self.group_connects = Buckets(connects_per_group, clock)
        self.named_failures = Buckets(failed_hellos_per_group, clock)
        self.max_streams_per_group = max_streams_per_group

    def connect(self, source: str) -> str | None:
        """A new tunnel connection from `source`, before its HELLO is read."""
        if not self.source_failures.available(source):
            return "source_failed_hellos"
        if not self.source_connects.take(source):
            return "source_connects"
        return None

    def hello(self, source: str, group: str) -> str | None:
        """A HELLO from `source` naming `group` (configured or not: the answer
        must not tell), before its credentials are checked. Nothing is taken.
        The source is asked again: connections opened at once all passed
        `connect` before any failed, and from here to `failed` nothing awaits."""
        if not self.source_failures.available(source):
            return "source_failed_hellos"
        if not self.named_failures.available(_named(group, source)):
            return "group_failed_hellos"
        return None

    def admit(self, group: str, streams: int) -> str | None:
        """An authenticated HELLO of configured `group`, holding `streams` streams here."""
        if streams >= self.max_streams_per_group:
            return "group_streams"
        if not self.group_connects.take(group):
            return "group_connects"
        return None

    def failed(self, source: str, group: str | None) -> None:
        """A HELLO from `source` was refused; `group` is the name it gave, if any
        (configured or not: the count must not tell which)."""
        self.source_failures.take(source)
        if group is not None:
            self.named_failures.take(_named(group, source))


def source_address(peer: str) -> str:
    """The address of a gRPC peer string ("ipv4:10.0.0.1:5000", "ipv6:[::1]:5000",
    "unix:/path"), without the port: what admission counts by."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer
