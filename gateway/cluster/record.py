"""A node's record in the fleet registry, and its JSON as Redis holds it. Pure
logic, no I/O."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

import orjson

__all__ = ["NodeRecord", "STATES", "glob_escape", "merge"]

STATES = ("serving", "draining")


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One node as the fleet sees it: its id, the address other nodes' routers dial
    (`peer`, e.g. tcp://10.0.0.2:7100), the one clients dial (`tunnel`, host:port),
    `state` (serving or draining), `started` (unix time), `groups` {group: streams
    held}, and `seen`, the node's own clock at its last write (unix time)."""

    node_id: str
    peer: str
    tunnel: str
    state: str = "serving"
    started: float = 0.0
    groups: dict[str, int] = field(default_factory=dict, hash=False)
    seen: float = 0.0

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> NodeRecord:
        """The record a key holds; ValueError when it is not one (a stray key under the prefix)."""
        try:
            d = orjson.loads(raw)
            groups = {str(k): int(v) for k, v in d.get("groups", {}).items()}
            rec = cls(node_id=str(d["node_id"]), peer=str(d["peer"]), tunnel=str(d["tunnel"]),
                      state=str(d["state"]), started=float(d["started"]), groups=groups,
                      seen=float(d.get("seen", 0.0)))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a node record: {exc}") from None
        if rec.state not in STATES:
            raise ValueError(f"not a node record: state {rec.state!r}")
        return rec

    def same(self, other: NodeRecord) -> bool:
        """Equal but for `seen`: what a change of the fleet is (a renewal is not one)."""
        return dataclasses.replace(other, seen=self.seen) == self


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
