"""Which gateway node each of the client's connections uses: pure decisions, no I/O.

The known nodes are the `server` list the client was given, and the fleet's
serving nodes the gateway told it (WELCOME, then FLEET frames; the newest list
wins, an empty one says nothing: one host or an older gateway). A node that
failed (connect error, stream lost, refused as draining, GOAWAY at shutdown) is
*down* for DOWN_FOR seconds, or until the gateway tells it again after leaving
it out (it came back): then it is tried again. The order is the sorted
addresses; a client's connection i has its home at `order[(i + offset) % n]`,
where `offset` comes from the client's identity: a restart changes nothing, and
clients of one connection each land on different nodes, not all on the first.

- `target`: where a connection (re)connects: the least-loaded usable node, its
  home first on a tie, so a fresh start puts connection i on its home. A node
  that has just drained the connection (an operator moving streams off it, as
  `rebalance.py --fleet` does) comes last on a tie, so the drain moves it.
  All down: the one back soonest (one node: that one, as before).
- `plan_move`: the one move that brings the connections closer to spread: off a
  node no longer usable, else from the fullest node to the emptiest when they
  differ by more than one. The agent makes at most one move at a time.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from gateway.settings import host_port

__all__ = ["DOWN_FOR", "Move", "NodeSet", "home_offset", "server_list"]

# How long a failed node is left alone before it is tried again. Trying costs one
# connection attempt (make-before-break: a failed move keeps the old stream), so it
# can be short: a node that comes back gets its connections within a few seconds.
DOWN_FOR = 3.0


def server_list(value: object) -> str:
    """The `server` setting: one host:port or a comma-separated list of them, kept
    as one string (the same in TOML, flags and environment), without repeats."""
    if not isinstance(value, str):
        raise ValueError("must be 'host:port' or a comma-separated list of them")
    items = [p.strip() for p in value.split(",")]
    if not items or any(not p for p in items):
        raise ValueError("must be 'host:port' or a comma-separated list of them (no empty item)")
    problems = [f"{item!r} is not 'host:port': {problem}" for item in items if (problem := _server_problem(item))]
    if problems:
        raise ValueError("; ".join(problems))
    return ",".join(dict.fromkeys(items))  # each once, in order


def _server_problem(item: str) -> str:
    """Why `item` is no address a tunnel can dial ("" when it is one)."""
    scheme, sep, rest = item.partition("://")
    if sep:
        return f"no scheme: write {rest.split('/', 1)[0] or 'host:port'!r} (TLS is the tls setting, not https://)"
    if any(c.isspace() or c in "/@?#" for c in item):
        return "a host name or address and a port, nothing more (no path, no user)"
    try:
        host_port(item)
    except ValueError:
        return "it needs ':PORT', a port number (the gateway's tunnel port is 50001 by default)"
    host, _, port = item.rpartition(":")
    if int(port) == 0:
        return "port 0 cannot be dialled"
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        return "an IPv6 address goes in brackets: [::1]:50001"
    return ""


def home_offset(group: str, client_id: str) -> int:
    """Where a client's homes start among the nodes: stable for its identity (a
    restart keeps it), different from client to client (crc32: spread, not secret)."""
    return zlib.crc32(f"{group}/{client_id}".encode())


@dataclass(frozen=True)
class Move:
    index: int  # the connection
    node: str  # where it goes
    why: str


class NodeSet:
    """The nodes this client knows, which are down, and where connections go."""

    def __init__(self, configured: Sequence[str], *, down_for: float = DOWN_FOR,
                 clock: Callable[[], float] = time.monotonic, offset: int = 0) -> None:
        self.configured = tuple(configured)
        self.offset = offset  # where this client's homes start (home_offset of its identity)
        self.told: tuple[str, ...] = ()  # the gateway's newest list
        self.down: dict[str, float] = {}  # node -> until when it is left alone
        self.down_for = down_for
        self.clock = clock

    def known(self) -> list[str]:
        return sorted(set(self.configured) | set(self.told))

    def usable(self) -> list[str]:
        now = self.clock()
        return [n for n in self.known() if self.down.get(n, 0.0) <= now]

    def learn(self, nodes: Sequence[str]) -> list[str]:
        """The gateway's list of serving nodes; returns the nodes it names that it did
        not before (joined, or back). An empty list tells nothing."""
        if not nodes:
            return []
        new = sorted(set(nodes) - set(self.told))
        self.told = tuple(sorted(set(nodes)))
        for node in new:
            # Back in the fleet: worth trying now, not when its down mark ends.
            self.down.pop(node, None)
        return new

    def mark_down(self, node: str) -> None:
        self.down[node] = self.clock() + self.down_for

    def home(self, index: int, usable: Sequence[str]) -> str:
        return usable[(index + self.offset) % len(usable)]

    def target(self, index: int, placed: Mapping[int, str | None], drained_by: str = "") -> str:
        """The node connection `index` connects to; `placed`: where every connection is now;
        `drained_by`: the node that sent it away with GOAWAY `drain`, last on a tie."""
        usable = self.usable()
        if not usable:
            known = self.known()
            return min(known, key=lambda n: (self.down.get(n, 0.0), known.index(n)))
        load = _load(usable, {i: n for i, n in placed.items() if i != index})
        home = self.home(index, usable)
        return min(usable, key=lambda n: (load[n], n == drained_by, n != home, usable.index(n)))

    def plan_move(self, placed: Mapping[int, str | None]) -> Move | None:
        """The next move towards an even spread, or None when spread (or nowhere to go)."""
        usable = self.usable()
        if not usable:
            return None
        load = _load(usable, placed)
        emptiest = min(usable, key=lambda n: (load[n], usable.index(n)))
        for index, node in sorted(placed.items()):
            if node is not None and node not in load:
                why = "node down" if node in self.down else "node left the fleet"
                return Move(index, emptiest, why)
        fullest = max(usable, key=lambda n: (load[n], -usable.index(n)))
        if load[fullest] - load[emptiest] <= 1:
            return None
        on_fullest = [i for i, n in sorted(placed.items()) if n == fullest]
        # The one whose home is the emptiest node, so the spread ends as i mod n.
        homed = [i for i in on_fullest if self.home(i, usable) == emptiest]
        return Move((homed or on_fullest)[-1], emptiest, "spread")


def _load(usable: Sequence[str], placed: Mapping[int, str | None]) -> dict[str, int]:
    load = {n: 0 for n in usable}
    for node in placed.values():
        if node in load:
            load[node] += 1
    return load
