#!/usr/bin/env python3
"""Even out tunnel streams over gateway workers.

Reads GET /admin/shards, and while some worker holds more than mean +
tolerance streams (or fewer than mean - tolerance), drains one stream from the
most loaded worker (POST /admin/drain {"worker": N, "limit": 1}); its client
reconnects and the kernel hands the new connection to some worker. Re-reads
after each step. --dry-run prints the plan and changes nothing.

--fleet evens out streams over the nodes of a fleet instead: reads GET
/admin/cluster (each node's streams by group), and while some serving node
holds more of a group's streams than mean + tolerance (over the serving
nodes), drains one of them (POST /admin/drain {"node": N, "group": G,
"limit": 1}: any node's admin drains any node's streams); its client
reconnects, to another node when its placement picks one (see README,
Several gateway hosts). Draining and unreachable nodes are left out.
--admin-token (or TUNNEL_GATEWAY_ADMIN_TOKEN, which keeps it out of `ps`) is
sent as `Authorization: Bearer TOKEN` to a gateway with admin_token set.

Exit codes: 0 balanced, 1 not balanced after --max-steps, 2 gateway unreachable.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Mapping, TypeVar

K = TypeVar("K", int, str)


class Unreachable(Exception):
    pass


# Sent with every admin request: the bearer token, when one is given.
HEADERS: dict[str, str] = {}


def _get(admin: str, path: str) -> Any:
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{admin}{path}", headers=HEADERS), timeout=5) as r:
            return json.load(r)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise Unreachable(f"cannot read {admin}{path}: {exc}") from None


def fetch_counts(admin: str) -> dict[int, int]:
    try:
        workers = _get(admin, "/admin/shards")["workers"]
        return {w["worker"]: sum(w["streams"].values()) for w in workers}
    except (KeyError, TypeError) as exc:
        raise Unreachable(f"unexpected answer from {admin}/admin/shards: {exc}") from None


def fetch_fleet(admin: str) -> dict[str, dict[str, int]]:
    """Streams by group of each serving node: a draining node's streams are leaving anyway,
    an unreachable one's cannot be drained."""
    try:
        nodes = _get(admin, "/admin/cluster")["nodes"]
        return {n["node_id"]: dict(n["groups"]) for n in nodes if n["state"] == "serving"}
    except (KeyError, TypeError) as exc:
        raise Unreachable(f"unexpected answer from {admin}/admin/cluster: {exc}") from None


def post_drain(admin: str, selection: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(f"{admin}/admin/drain", data=json.dumps(selection).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **HEADERS})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:
        # 404 unknown node, 503 node unreachable: the gateway's message says which.
        raise Unreachable(f"POST {admin}/admin/drain {selection}: {exc.code} {exc.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise Unreachable(f"cannot POST {admin}/admin/drain: {exc}") from None


def drain_one(admin: str, worker: int) -> None:
    post_drain(admin, {"worker": worker, "limit": 1})


def is_balanced(counts: Mapping[Any, int], tolerance: float) -> bool:
    if not counts:
        return True
    mean = sum(counts.values()) / len(counts)
    return all(abs(n - mean) <= tolerance for n in counts.values())


def plan(counts: Mapping[K, int], tolerance: float, max_steps: int) -> list[tuple[K, K]]:
    """Moves (from, to) that would balance `counts`, as if streams could be placed."""
    sim = dict(counts)
    rank = {w: i for i, w in enumerate(sorted(sim))}  # ties go to the first worker (node)
    moves: list[tuple[K, K]] = []
    while not is_balanced(sim, tolerance) and len(moves) < max_steps:
        src = max(sim, key=lambda w: (sim[w], -rank[w]))
        dst = min(sim, key=lambda w: (sim[w], rank[w]))
        if sim[src] - sim[dst] < 2:
            break
        sim[src] -= 1
        sim[dst] += 1
        moves.append((src, dst))
    return moves


def wait_settled(admin: str, total: int, timeout: float) -> dict[int, int]:
    """Wait until the drained stream has reconnected somewhere."""
    deadline = time.monotonic() + timeout
    counts = fetch_counts(admin)
    while sum(counts.values()) < total and time.monotonic() < deadline:
        time.sleep(0.2)
        counts = fetch_counts(admin)
    # The shard table lags the worker by a heartbeat; one more read settles it.
    time.sleep(0.5)
    return fetch_counts(admin)


def by_group(fleet: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """{group: {node: streams}}, every serving node in each group (0 where it holds none)."""
    groups = sorted({g for held in fleet.values() for g in held})
    return {g: {node: held.get(g, 0) for node, held in fleet.items()} for g in groups}


def next_fleet_drain(fleet: Mapping[str, Mapping[str, int]], tolerance: float) -> tuple[str, str] | None:
    """(node, group) to drain one stream of next, or None when every group is spread."""
    for group, counts in by_group(fleet).items():
        moves = plan(counts, tolerance, 1)
        if moves:
            return moves[0][0], group
    return None


def wait_fleet_settled(admin: str, node: str, group: str, before: Mapping[str, Mapping[str, int]],
                       timeout: float) -> dict[str, dict[str, int]]:
    """Wait until the drained stream left `node` and its client reconnected somewhere."""
    held, total = before[node].get(group, 0), sum(n.get(group, 0) for n in before.values())
    deadline = time.monotonic() + timeout
    fleet = fetch_fleet(admin)
    while time.monotonic() < deadline and not (
            fleet.get(node, {}).get(group, 0) < held and sum(n.get(group, 0) for n in fleet.values()) >= total):
        time.sleep(0.2)
        fleet = fetch_fleet(admin)
    # The registry lags a node by a publish; one more read settles it.
    time.sleep(0.5)
    return fetch_fleet(admin)


def run_fleet(admin: str, args: argparse.Namespace) -> int:
    fleet = fetch_fleet(admin)
    print(f"streams per node: {fleet}")
    if args.dry_run:
        moves = [(g, src, dst) for g, counts in by_group(fleet).items()
                 for src, dst in plan(counts, args.tolerance, args.max_steps)]
        if not moves:
            print("balanced: nothing to do")
        for group, src, dst in moves:
            print(f"would drain one stream of group {group} from node {src} (towards node {dst})")
        return 0
    steps = 0
    while (step := next_fleet_drain(fleet, args.tolerance)) is not None:
        if steps >= args.max_steps:
            print(f"not balanced after {steps} drains: {fleet}", file=sys.stderr)
            return 1
        node, group = step
        print(f"draining one stream of group {group} from node {node} ({fleet[node].get(group, 0)} streams)")
        answer = post_drain(admin, {"node": node, "group": group, "limit": 1})
        steps += 1
        if answer.get("drained", 1) == 0:  # nothing left to take there (all draining): look again
            time.sleep(0.5)
            fleet = fetch_fleet(admin)
        else:
            fleet = wait_fleet_settled(admin, node, group, fleet, args.settle_timeout)
        print(f"streams per node: {fleet}")
    print(f"balanced after {steps} drains: {fleet}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--admin", default="http://127.0.0.1:9090", help="gateway admin URL")
    p.add_argument("--fleet", action="store_true", help="even out over the fleet's nodes (/admin/cluster)")
    p.add_argument("--tolerance", type=float, default=1.0, help="allowed distance from the mean (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--max-steps", type=int, default=50, help="drains at most (default 50)")
    p.add_argument("--settle-timeout", type=float, default=15.0, help="seconds to wait for a reconnect")
    p.add_argument("--admin-token", default=os.environ.get("TUNNEL_GATEWAY_ADMIN_TOKEN", ""),
                   help="the gateway's admin_token (default: $TUNNEL_GATEWAY_ADMIN_TOKEN)")
    args = p.parse_args(argv)
    HEADERS.clear()
    if args.admin_token:
        HEADERS["Authorization"] = f"Bearer {args.admin_token}"
    admin = args.admin.rstrip("/")
    try:
        if args.fleet:
            return run_fleet(admin, args)
        counts = fetch_counts(admin)
        print(f"streams per worker: {counts}")
        if args.dry_run:
            moves = plan(counts, args.tolerance, args.max_steps)
            if not moves:
                print("balanced: nothing to do")
            for src, dst in moves:
                print(f"would drain one stream from worker {src} (towards worker {dst})")
            return 0
        steps = 0
        while not is_balanced(counts, args.tolerance):
            if steps >= args.max_steps:
                print(f"not balanced after {steps} drains: {counts}", file=sys.stderr)
                return 1
            src = max(counts, key=lambda w: (counts[w], -w))
            total = sum(counts.values())
            print(f"draining one stream from worker {src} ({counts[src]} streams)")
            drain_one(admin, src)
            steps += 1
            counts = wait_settled(admin, total, args.settle_timeout)
            print(f"streams per worker: {counts}")
        print(f"balanced after {steps} drains: {counts}")
        return 0
    except Unreachable as exc:
        print(f"rebalance: gateway unreachable: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
