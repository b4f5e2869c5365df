"""A worker's figures for the rollouts baking: per group, the requests its
entries sent to canary clients and to the rest, the failures (5xx) among
them and their latencies, in the bins of gateway/history.py (so workers' and
nodes' figures add up exactly). Fed at the end of each request by
gateway.http.entry; read by the deciding worker (`snapshot`)."""
from __future__ import annotations

from bisect import bisect_left
from typing import Any, Mapping

from gateway.history import BOUNDS

__all__ = ["RolloutStats", "process_rollout_stats"]


class RolloutStats:
    __slots__ = ("watching", "_canary", "_sides")

    def __init__(self) -> None:
        # group -> the version baking; an entry counts a request only for a group here.
        self.watching: dict[str, str] = {}
        self._canary: dict[str, frozenset[str]] = {}
        self._sides: dict[str, tuple[list[Any], list[Any]]] = {}

    def watch(self, baking: Mapping[str, tuple[str, list[str]]]) -> None:
        """Count for these rollouts (group -> (new version, canary clients)); a new
        version starts from zero, a group no longer baking is dropped."""
        for g in list(self.watching):
            if g not in baking or baking[g][0] != self.watching[g]:
                del self.watching[g]
                self._sides.pop(g, None)
                self._canary.pop(g, None)
        for g, (version, canary) in baking.items():
            self._canary[g] = frozenset(canary)
            if g not in self.watching:
                self._sides[g] = ([0, 0, {}], [0, 0, {}])
                self.watching[g] = version

    def add(self, group: str, client_id: str, status: int, seconds: float) -> None:
        """A request of `group` that a client served (or failed): canary or rest by `client_id`."""
        sides = self._sides.get(group)
        if sides is None or not client_id:
            return  # no client was reached: not the config's doing
        side = sides[0] if client_id in self._canary[group] else sides[1]
        side[0] += 1
        if status >= 500:
            side[1] += 1
        k = bisect_left(BOUNDS, seconds)
        side[2][k] = side[2].get(k, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """{group: {"version", "canary": {"requests", "errors", "bins"}, "rest": ...}}, JSON-able."""
        out = {}
        for g, (canary, rest) in self._sides.items():
            out[g] = {"version": self.watching[g],
                      **{name: {"requests": s[0], "errors": s[1], "bins": {str(k): n for k, n in s[2].items()}}
                         for name, s in (("canary", canary), ("rest", rest))}}
        return out


_process: RolloutStats | None = None


def process_rollout_stats() -> RolloutStats:
    """This process's figures (a worker is one process): its HTTP and gRPC entries feed it."""
    global _process
    if _process is None:
        _process = RolloutStats()
    return _process
