"""A node's rollouts and their decisions. Pure logic: JSON in and out, no I/O.

Per group with a rollout table: `stable`, the config every client outside a
canary runs (the last promoted one); the current or last `Rollout`; the
version last rolled back (`rejected`: not tried again until the file
changes); and the last rollouts (`history`). The deciding worker changes the
book (`reconcile` on a reload or at start, `tick` as figures come in,
`promote` / `roll_back` by hand); every worker reads it to know which version
a client gets (`assigned`). A group without a rollout table is not in the book:
its clients run the file's config, changed for all at once.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple

from gateway.history import percentile
from gateway.rollout.spec import RolloutSpec

__all__ = ["Book", "Rollout", "Figures", "GroupView", "ClientState", "HISTORY", "LATENCY_FLOOR", "canary_order"]

HISTORY = 10  # finished rollouts kept per group
# Latencies under this many seconds count as this much when canary and rest are
# compared: sub-10 ms jitter is not a regression worth a rollback.
LATENCY_FLOOR = 0.010


class GroupView(NamedTuple):
    """What a config says of a group: its client config's version and JSON, and its rollout table."""

    version: str
    config: str
    spec: RolloutSpec | None


class ClientState(NamedTuple):
    """A connected client as the deciding worker sees it: the version it last
    acknowledged, and the last version it refused ("" none) and why."""

    acked: str
    refused: str = ""
    error: str = ""


@dataclass
class Figures:
    """One side's requests during a bake: how many, how many failed (5xx), their latency bins."""

    requests: int = 0
    errors: int = 0
    bins: dict[int, int] = field(default_factory=dict)

    def add(self, other: Mapping[str, Any]) -> None:
        self.requests += int(other.get("requests", 0))
        self.errors += int(other.get("errors", 0))
        for k, n in other.get("bins", {}).items():
            self.bins[int(k)] = self.bins.get(int(k), 0) + int(n)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p99(self) -> float | None:
        return percentile(self.bins, 0.99)

    def to_json(self) -> dict[str, Any]:
        p99 = self.p99
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "p99_ms": round(p99 * 1000, 2) if p99 is not None else None}


@dataclass
class Rollout:
    group: str
    old: str                 # the stable version it started from
    new: str
    old_config: str
    new_config: str
    spec: RolloutSpec
    canary: list[str]
    started: float           # unix time
    state: str = "baking"    # baking, rolling_back, promoted, rolled_back, halted
    reason: str = ""         # why it was decided so (or why it still bakes)
    ended: float = 0.0
    acknowledged: bool = False  # every client concerned runs the decided version
    undo: bool = False       # rolled back after its promotion: every client goes back, not only the canary
    figures: dict[str, Any] = field(default_factory=dict)  # {"canary": ..., "rest": ...} as last judged

    @property
    def deadline(self) -> float:
        return self.started + self.spec.bake

    def summary(self, now: float) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("old_config", "new_config", "spec")}
        out["spec"] = self.spec.to_json()
        out["time_left"] = round(max(0.0, self.deadline - now), 1) if self.state == "baking" else 0.0
        return out

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["spec"] = dataclasses.asdict(self.spec)
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "Rollout":
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in raw.items() if k in fields}
        data["spec"] = RolloutSpec(**raw["spec"])
        data["canary"] = list(raw.get("canary", ()))
        return cls(**data)


def canary_order(group: str, version: str, clients: Iterable[str]) -> list[str]:
    """`clients` in rendezvous-hash order for this version: the same clients come
    first on every worker and node, and a client joining moves nobody else."""
    def score(client: str) -> bytes:
        return hashlib.sha256(f"{group}\0{version}\0{client}".encode()).digest()
    return sorted(set(clients), key=score, reverse=True)


Event = dict[str, Any]  # {"group", "event", "version", "reason"}: what the worker logs and counts


class Book:
    def __init__(self) -> None:
        self.stable: dict[str, tuple[str, str]] = {}
        self.rollouts: dict[str, Rollout] = {}
        self.rejected: dict[str, str] = {}
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.revision = 0

    # -- what every worker reads -------------------------------------------------

    def assigned(self, group: str, client_id: str) -> tuple[str, str] | None:
        """(version, config JSON) `client_id` of `group` runs now; None: the file's."""
        r = self.rollouts.get(group)
        if r is not None and r.state == "baking" and client_id in r.canary:
            return r.new, r.new_config
        return self.stable.get(group)

    def pin(self, old: Mapping[str, GroupView], new: Mapping[str, GroupView]) -> bool:
        """Keep a group that has (or gains) a rollout table on the config it ran
        (the deciding worker starts the rollout); forget groups that have none. True if changed."""
        changed = False
        for g in list(self.stable):
            view = new.get(g)
            if view is None or view.spec is None:
                self._forget(g, keep_history=view is not None)
                changed = True
        for g, view in new.items():
            if view.spec is not None and g not in self.stable:
                before = old.get(g)
                self.stable[g] = (before.version, before.config) if before is not None else (view.version, view.config)
                changed = True
        return changed

    def _forget(self, group: str, keep_history: bool) -> None:
        for table in (self.stable, self.rollouts, self.rejected):
            table.pop(group, None)
        if not keep_history:
            self.history.pop(group, None)

    # -- what the deciding worker does -------------------------------------------

    def reconcile(self, old: Mapping[str, GroupView], new: Mapping[str, GroupView],
                  clients: Mapping[str, Iterable[str]], now: float) -> list[Event]:
        """Bring the book to a config just loaded: start a rollout for each group whose
        file version is neither the stable one, nor the one baking, nor the rejected one."""
        events: list[Event] = []
        if self.pin(old, new):
            self.revision += 1
        for g, view in new.items():
            if view.spec is None:
                continue
            stable_version, stable_config = self.stable[g]
            r = self.rollouts.get(g)
            active = r if r is not None and r.state == "baking" else None
            if view.version == stable_version:
                if active is not None:
                    events += self._end(active, "rolled_back", now, f"the file is back at version {stable_version}")
                if self.rejected.pop(g, None) is not None:  # the file changed (back): nothing is rejected now
                    self.revision += 1
                continue
            if active is not None and active.new == view.version:
                if active.spec != view.spec:  # only the rollout table changed (say a shorter bake): it applies now
                    active.spec = view.spec
                    self.revision += 1
                continue
            if view.version == self.rejected.get(g):
                continue
            if active is not None:
                events += self._end(active, "replaced", now, f"a reload brought version {view.version}")
            self.rejected.pop(g, None)
            rollout = Rollout(g, stable_version, view.version, stable_config, view.config, view.spec, [], now)
            self._top_up(rollout, clients.get(g, ()))
            self.rollouts[g] = rollout
            self.revision += 1
            events.append({"group": g, "event": "started", "version": view.version,
                           "reason": f"canary {rollout.canary or '(none connected yet)'}, bake {view.spec.bake:g}s"})
        return events

    def _top_up(self, r: Rollout, connected: Iterable[str]) -> bool:
        """Add canaries while fewer than the spec asks for the clients known (a group may have none yet)."""
        connected = list(connected)
        wanted = r.spec.canary_size(len(set(connected) | set(r.canary)))
        added = False
        for client in canary_order(r.group, r.new, connected):
            if len(r.canary) >= wanted:
                break
            if client not in r.canary:
                r.canary.append(client)
                added = True
        return added

    def tick(self, figures: Mapping[str, tuple[Figures, Figures]],
             clients: Mapping[str, Mapping[str, ClientState]], now: float) -> list[Event]:
        """Judge the rollouts in progress by the figures (group -> (canary, rest)) and
        the clients' acknowledgements (group -> client_id -> state)."""
        events: list[Event] = []
        for g, r in list(self.rollouts.items()):
            seen = clients.get(g, {})
            if r.state == "baking":
                if self._top_up(r, seen):
                    self.revision += 1
                events += self._judge(r, figures.get(g, (Figures(), Figures())), seen, now)
            if r.state in ("rolling_back", "halted", "rolled_back", "promoted") and not r.acknowledged:
                concerned = list(seen) if r.state == "promoted" or r.undo else r.canary
                version = r.new if r.state == "promoted" else r.old
                # A client gone counts as done: whenever it comes back it gets `version`.
                if all(seen[c].acked == version for c in concerned if c in seen):
                    r.acknowledged = True
                    if r.state == "rolling_back":
                        r.state = "rolled_back"
                        self._remember(r, now)
                        events.append({"group": g, "event": "rolled_back", "version": r.new, "reason": r.reason})
                    self.revision += 1
        return events

    def _judge(self, r: Rollout, sides: tuple[Figures, Figures], seen: Mapping[str, ClientState],
               now: float) -> list[Event]:
        canary, rest = sides
        r.figures = {"canary": canary.to_json(), "rest": rest.to_json()}
        for c in r.canary:
            state = seen.get(c)
            if state is not None and state.refused == r.new:
                return self._end(r, "halted", now, f"client {c} refused version {r.new}: {state.error}")
        spec = r.spec
        wanted = max(1, spec.min_requests)
        ratio = _latency_ratio(canary, rest, wanted)  # None while either side has fewer
        if canary.requests >= wanted:
            if canary.error_rate > spec.max_error_rate:
                return self.roll_back(r.group, now, f"canary error rate {canary.error_rate:.1%} over "
                                                    f"{spec.max_error_rate:.1%} ({canary.errors} of {canary.requests})")
            if ratio is not None and ratio > spec.max_latency_ratio:
                return self.roll_back(r.group, now, f"canary p99 {ratio:.2f}x the rest's, over "
                                                    f"{spec.max_latency_ratio:g}x")
        if now < r.deadline:
            r.reason = "baking"
            return []
        if canary.requests < wanted:
            r.reason = f"bake time over; waiting for {wanted - canary.requests} more canary request(s) before judging"
            return []
        return self._end(r, "promoted", now, f"canary error rate {canary.error_rate:.1%} over {canary.requests} "
                                             f"requests" + (f", p99 {ratio:.2f}x the rest's" if ratio else ""))

    # -- decisions ---------------------------------------------------------------

    def promote(self, group: str, now: float, why: str) -> list[Event]:
        r = self.rollouts.get(group)
        if r is None or r.state == "promoted":
            raise LookupError(f"group {group!r} has no rollout to promote")
        return self._end(r, "promoted", now, why)

    def roll_back(self, group: str, now: float, why: str) -> list[Event]:
        r = self.rollouts.get(group)
        if r is None or r.state not in ("baking", "promoted"):
            raise LookupError(f"group {group!r} has no rollout baking or promoted to roll back")
        r.undo = r.state == "promoted"
        return self._end(r, "rolling_back", now, why)

    def _end(self, r: Rollout, state: str, now: float, why: str) -> list[Event]:
        g = r.group
        r.reason, r.ended, r.acknowledged = why, now, False
        self.revision += 1
        if state == "replaced":
            r.state = state
            self._remember(r, now)
            return [{"group": g, "event": "replaced", "version": r.new, "reason": why}]
        if state == "promoted":
            self.stable[g] = (r.new, r.new_config)
            self.rejected.pop(g, None)
        else:
            # Whatever ran before it runs again, for the canaries (or, undoing a promotion, for all).
            self.stable[g] = (r.old, r.old_config)
            self.rejected[g] = r.new
        r.state = state
        self._remember(r, now)
        return [{"group": g, "event": state, "version": r.new, "reason": why}]

    def _remember(self, r: Rollout, now: float) -> None:
        kept = self.history.setdefault(r.group, [])
        if kept and kept[0]["started"] == r.started and kept[0]["new"] == r.new:
            del kept[0]  # the same rollout, a step further (rolling back, then rolled back)
        kept.insert(0, {"old": r.old, "new": r.new, "state": r.state, "reason": r.reason, "started": r.started,
                        "ended": r.ended, "canary": list(r.canary), "figures": r.figures})
        del kept[HISTORY:]

    # -- JSON --------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "stable": {g: list(v) for g, v in self.stable.items()},
                "rollouts": {g: r.to_json() for g, r in self.rollouts.items()},
                "rejected": dict(self.rejected), "history": self.history}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "Book":
        book = cls()
        book.revision = int(raw.get("revision", 0))
        book.stable = {g: (str(v[0]), str(v[1])) for g, v in raw.get("stable", {}).items()}
        book.rollouts = {g: Rollout.from_json(r) for g, r in raw.get("rollouts", {}).items()}
        book.rejected = {g: str(v) for g, v in raw.get("rejected", {}).items()}
        book.history = {g: list(v)[:HISTORY] for g, v in raw.get("history", {}).items()}
        return book


def _latency_ratio(canary: Figures, rest: Figures, wanted: int) -> float | None:
    """Canary p99 over the rest's (each at least LATENCY_FLOOR); None while either side
    has fewer than `wanted` requests."""
    if rest.requests < wanted or canary.requests < wanted:
        return None
    c, r = canary.p99, rest.p99
    if c is None or r is None:
        return None
    return max(c, LATENCY_FLOOR) / max(r, LATENCY_FLOOR)
