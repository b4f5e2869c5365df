#!/usr/bin/env python3
"""Even out tunnel streams over gateway workers.

Reads GET /admin/shards, and while some worker holds more than mean +
tolerance streams (or fewer than mean - tolerance), drains one stream from the
most loaded worker (POST /admin/drain {"worker": N, "limit": 1}); its client
reconnects and the kernel hands the new connection to some worker. Re-reads
after each step. --dry-run prints the plan and changes nothing.
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


class Unreachable(Exception):
    pass


# Sent with every admin request: the bearer token, when one is given.
HEADERS: dict[str, str] = {}


def fetch_counts(admin: str) -> dict[int, int]:
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{admin}/admin/shards", headers=HEADERS),
                                    timeout=5) as r:
            workers = json.load(r)["workers"]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        raise Unreachable(f"cannot read {admin}/admin/shards: {exc}") from None
    return {w["worker"]: sum(w["streams"].values()) for w in workers}


def drain_one(admin: str, worker: int) -> None:
    body = json.dumps({"worker": worker, "limit": 1}).encode()
    req = urllib.request.Request(f"{admin}/admin/drain", data=body, method="POST",
                                 headers={"Content-Type": "application/json", **HEADERS})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(f"cannot POST {admin}/admin/drain: {exc}") from None


def is_balanced(counts: dict[int, int], tolerance: float) -> bool:
    if not counts:
        return True
    mean = sum(counts.values()) / len(counts)
    return all(abs(n - mean) <= tolerance for n in counts.values())


def plan(counts: dict[int, int], tolerance: float, max_steps: int) -> list[tuple[int, int]]:
    """Moves (from, to) that would balance `counts`, as if streams could be placed."""
    sim = dict(counts)
    moves = []
    while not is_balanced(sim, tolerance) and len(moves) < max_steps:
        src = max(sim, key=lambda w: (sim[w], -w))
        dst = min(sim, key=lambda w: (sim[w], w))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--admin", default="http://127.0.0.1:9090", help="gateway admin URL")
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
