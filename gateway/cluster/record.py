"""A node's record in the fleet registry, and its JSON as Redis holds it. Pure
logic, no I/O."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import orjson

__all__ = ["ClientLoad", "NodeRecord", "STATES", "WorkerLoad", "glob_escape", "merge", "routing_changed"]

STATES = ("serving", "draining")
_WORKER = re.compile(r"w[0-9]{1,6}")


@dataclass(frozen=True, slots=True)
class ClientLoad:
    """One client stream a node's worker holds, as other nodes route by it:
    requests in flight on it, whether it drains, the upstreams its client reports down;
    and what tells a duplicate identity on another node (when it connected, the
    certificate's names with mTLS, the client process's instance)."""

    client_id: str
    group: str
    connection: str
    inflight: int = 0
    draining: bool = False
    unhealthy: tuple[str, ...] = ()
    connected_at: float = 0.0
    certificate: tuple[str, ...] = ()
    instance: str = ""
    # The group config version the client acknowledged, then the last it refused and why (if any).
    config: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """A worker of a node (`w0`, `w1`, ...): its client streams and the frame
    capabilities its code reads (a channel to it uses them)."""

    clients: tuple[ClientLoad, ...] = ()
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One node as the fleet sees it: its id, the address other nodes' routers dial
    (`peer`, e.g. tcp://10.0.0.2:7100), the one clients dial (`tunnel`, host:port),
    `state` (serving or draining), `started` (unix time), `groups` {group: streams
    held}, `workers` {"wI": WorkerLoad}, what other nodes route requests by, and
    `seen`, the node's own clock at its last write (unix time), and `curve_key`, its
    CURVE public key (Z85; empty: its peer links are plaintext)."""

    node_id: str
    peer: str
    tunnel: str
    state: str = "serving"
    started: float = 0.0
    groups: dict[str, int] = field(default_factory=dict, hash=False)
    seen: float = 0.0
    workers: dict[str, WorkerLoad] = field(default_factory=dict, hash=False)
    curve_key: str = ""

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> NodeRecord:
        """The record a key holds; ValueError when it is not one (a stray key under the prefix)."""
        try:
            d = orjson.loads(raw)
            groups = {str(k): int(v) for k, v in d.get("groups", {}).items()}
            # A record of a node without workers (part 1 of the fleet) has none to route to.
            workers = {_worker_key(k): _worker(v) for k, v in _of(dict, d.get("workers", {})).items()}
            rec = cls(node_id=str(d["node_id"]), peer=str(d["peer"]), tunnel=str(d["tunnel"]),
                      state=str(d["state"]), started=float(d["started"]), groups=groups,
                      seen=float(d.get("seen", 0.0)), workers=workers,
                      curve_key=_of(str, d.get("curve_key", "")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a node record: {exc}") from None
        if rec.state not in STATES:
            raise ValueError(f"not a node record: state {rec.state!r}")
        return rec

    def same(self, other: NodeRecord) -> bool:
        """Equal but for `seen`: what a change of the fleet is (a renewal is not one)."""
        return dataclasses.replace(other, seen=self.seen) == self


def _of(kind: type, value: Any) -> Any:
    # Exact types: a bool is no count, a number no name (a stray or forged key is refused).
    if type(value) is not kind:
        raise TypeError(f"{value!r} is not a {kind.__name__}")
    return value


def _worker_key(key: str) -> str:
    if not _WORKER.fullmatch(key):
        raise ValueError(f"worker {key!r} is not wN")
    return key


def _client(d: Any) -> ClientLoad:
    d = _of(dict, d)
    inflight = _of(int, d["inflight"])
    if inflight < 0:
        raise ValueError("inflight below 0")
    # The identity fields are newer than the rest: a record of an older node lacks them.
    connected_at = d.get("connected_at", 0.0)
    if type(connected_at) is int:  # a whole number of seconds, as JSON may write it
        connected_at = float(connected_at)
    return ClientLoad(_of(str, d["client_id"]), _of(str, d["group"]), _of(str, d["connection"]), inflight,
                      _of(bool, d["draining"]), tuple(_of(str, u) for u in _of(list, d["unhealthy"])),
                      _of(float, connected_at),
                      tuple(_of(str, n) for n in _of(list, d.get("certificate", []))),
                      _of(str, d.get("instance", "")),
                      tuple(_of(str, v) for v in _of(list, d.get("config", []))[:3]))


def _worker(d: Any) -> WorkerLoad:
    d = _of(dict, d)
    return WorkerLoad(tuple(_client(c) for c in _of(list, d["clients"])),
                      tuple(_of(str, c) for c in _of(list, d["capabilities"])))


def routing_changed(old: NodeRecord, new: NodeRecord) -> bool:
    """Does `new` differ from `old` in what other nodes route by: anything but
    `seen` and the in-flight figures (those ride on the next lease renewal)?"""
    def shape(rec: NodeRecord) -> NodeRecord:
        workers = {k: dataclasses.replace(w, clients=tuple(dataclasses.replace(c, inflight=0) for c in w.clients))
                   for k, w in rec.workers.items()}
        return dataclasses.replace(rec, seen=0.0, workers=workers)

    return shape(old) != shape(new)


def glob_escape(text: str) -> str:
    """`text` as a glob (SCAN MATCH) that matches only itself: a prefix may hold * ? [ ] or \\."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def merge(nodes: Mapping[str, NodeRecord], own: str, updates: Mapping[str, NodeRecord | None], *,
          drop_absent: bool) -> tuple[dict[str, NodeRecord], list[str], list[str], bool]:
    """A copy of the fleet after what Redis said. `updates` is {node_id: record, or None
    for gone}; with `drop_absent` (a full resync) a node missing from it is gone too.
    The own node (`own`) is never touched: its record is the one this node holds.
    Returns (nodes, joined, left, changed); `changed` is any join, leave or change but
    of `seen` alone (a renewal is no change)."""
    out = dict(nodes)
    joined: list[str] = []
    left = [n for n in nodes if n != own and n not in updates] if drop_absent else []
    changed = bool(left)
    for node_id, rec in updates.items():
        old = out.get(node_id)
        if node_id == own or (rec is None and old is None):
            continue
        if rec is None:
            left.append(node_id)
        elif old is None:
            joined.append(node_id)
        changed = changed or rec is None or old is None or not old.same(rec)
        if rec is not None:
            out[node_id] = rec
    for node_id in left:
        del out[node_id]
    return out, joined, left, changed
