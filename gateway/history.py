"""Fifteen minutes of a worker's traffic, for the status page's graphs.

A ring of 5-second buckets, in total and per group. Each bucket counts the
requests that ended in it, the errors among them, and their latencies in a
small fixed histogram of log-spaced bins (0.1 ms to ~104 s, four bins per
doubling: a percentile read from it is within ~10% of the true one). The bins
are the same in every worker, so buckets of many workers add up exactly and a
percentile of the sum is as good as one of a single worker.

An *error* is a request answered with a 5xx status: 502, 503, 504 the gateway
answered (tunnel_closed, no_client_available, overloaded, timeout,
upstream_unavailable, bad_response) or a 5xx from the upstream; a gRPC call that
did not end OK is recorded as 502 by its entry. A refused request (4xx) is the
caller's mistake and a caller that went away (499) is not the gateway's: both
count as requests, not as errors. A request no rule matched has no group: it
counts in the total only.

Recording is O(1) and allocates nothing per request (an int increment in a
preallocated list); a bucket is cleared the first time it is reused, so old
buckets expire without a timer. No I/O here: `History` is fed by the entries
(`gateway.http.entry.EntryLog`), `snapshot` is what a worker tells the worker
that answers /admin/history, `merge` + `view` are what that one answers.
"""
from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any, Iterable

__all__ = ["History", "WIDTH", "SPAN", "BOUNDS", "process_history", "merge", "view", "percentile"]

WIDTH = 5  # seconds a bucket covers
SPAN = 900  # seconds of history kept: 15 minutes
SLOTS = SPAN // WIDTH
# Upper bounds (seconds) of the latency bins: 0.1 ms * 2^(k/4); one bin more above the last.
BOUNDS: tuple[float, ...] = tuple(0.0001 * 2 ** (k / 4) for k in range(81))
BINS = len(BOUNDS) + 1
_STRIDE = 2 + BINS  # a bucket in the flat list: requests, errors, then the bins
_ZERO = [0] * _STRIDE
# Groups come from the config; a bound all the same (more are counted in the total only).
MAX_GROUPS = 256


class _Ring:
    """One series' buckets: a flat list of SLOTS * (2 + BINS) ints and, per slot,
    the bucket number it holds (a slot of an older bucket is cleared on reuse)."""

    __slots__ = ("counts", "stamps")

    def __init__(self) -> None:
        self.counts = [0] * (SLOTS * _STRIDE)
        self.stamps = [-1] * SLOTS

    def add(self, bucket: int, k: int, error: bool) -> None:
        slot = bucket % SLOTS
        base = slot * _STRIDE
        counts = self.counts
        if self.stamps[slot] != bucket:
            self.stamps[slot] = bucket
            counts[base:base + _STRIDE] = _ZERO
        counts[base] += 1
        if error:
            counts[base + 1] += 1
        counts[base + 2 + k] += 1

    def rows(self, end: int) -> list[list[Any]]:
        """The buckets of (end - SLOTS, end] that saw a request, oldest first, as
        [bucket, requests, errors, [bin, count, bin, count, ...]]."""
        out = []
        counts = self.counts
        for slot, bucket in enumerate(self.stamps):
            if end - SLOTS < bucket <= end:
                base = slot * _STRIDE
                if counts[base]:
                    bins = []
                    for k in range(BINS):
                        n = counts[base + 2 + k]
                        if n:
                            bins += (k, n)
                    out.append([bucket, counts[base], counts[base + 1], bins])
        out.sort(key=lambda r: r[0])
        return out


class History:
    """A worker's last 15 minutes: `add` at the end of each request."""

    __slots__ = ("total", "groups", "clock")

    def __init__(self, clock: Any = time.time) -> None:
        self.total = _Ring()
        self.groups: dict[str, _Ring] = {}
        self.clock = clock

    def add(self, group: str, seconds: float, error: bool) -> None:
        """One request that ended now: its group ("" for none), how long it took, whether it was an error."""
        bucket = int(self.clock() // WIDTH)
        k = bisect_left(BOUNDS, seconds)
        self.total.add(bucket, k, error)
        if group:
            ring = self.groups.get(group)
            if ring is None:
                if len(self.groups) >= MAX_GROUPS:
                    return
                ring = self.groups[group] = _Ring()
            ring.add(bucket, k, error)

    def snapshot(self, group: str | None = None) -> dict[str, Any]:
        """The compact, JSON-able form (only buckets that saw requests); with `group`, that group alone."""
        end = int(self.clock() // WIDTH)
        groups = {}
        for name, ring in list(self.groups.items()):
            if group is not None and name != group:
                continue
            rows = ring.rows(end)
            if rows:
                groups[name] = rows
            elif max(ring.stamps) <= end - SLOTS:
                del self.groups[name]  # nothing in 15 minutes (a group removed by a reload)
        return {"width": WIDTH, "bins": BINS, "end": end, "total": self.total.rows(end), "groups": groups}


_process: History | None = None


def process_history() -> History:
    """This process's history (a worker is one process): the HTTP and gRPC entries both feed it."""
    global _process
    if _process is None:
        _process = History()
    return _process


# -- the answering worker: add up, read out -------------------------------------

Merged = dict[int, list[Any]]  # bucket -> [requests, errors, {bin: count}]


def _merge_rows(into: Merged, rows: Iterable[list[Any]]) -> None:
    for bucket, requests, errors, bins in rows:
        acc = into.get(bucket)
        if acc is None:
            acc = into[bucket] = [0, 0, {}]
        acc[0] += requests
        acc[1] += errors
        hist = acc[2]
        for i in range(0, len(bins) - 1, 2):
            k = int(bins[i])
            if 0 <= k < BINS:
                hist[k] = hist.get(k, 0) + int(bins[i + 1])


def merge(snapshots: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    """Several workers' snapshots added up: {"end", "total": Merged, "groups": {group: Merged}}.
    A snapshot of another layout (bucket width or bins: a worker of other code) is left out."""
    total: Merged = {}
    groups: dict[str, Merged] = {}
    end = 0
    for snap in snapshots:
        if not snap or snap.get("width") != WIDTH or snap.get("bins") != BINS:
            continue
        try:
            _merge_rows(total, snap["total"])
            for name, rows in snap["groups"].items():
                _merge_rows(groups.setdefault(str(name), {}), rows)
            end = max(end, int(snap["end"]))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # a malformed answer: what it added so far stays, the rest is left out
    return {"end": end or int(time.time() // WIDTH), "total": total, "groups": groups}


def percentile(hist: dict[int, int], q: float) -> float | None:
    """The q-quantile (0..1, seconds) of a latency histogram, linear within its bin; None when empty."""
    n = sum(hist.values())
    if not n:
        return None
    rank = q * n
    seen = 0
    for k in sorted(hist):
        count = hist[k]
        if seen + count >= rank:
            if k >= len(BOUNDS):
                return BOUNDS[-1]
            lo = BOUNDS[k - 1] if k else 0.0
            return lo + (BOUNDS[k] - lo) * max(0.0, rank - seen) / count
        seen += count
    return BOUNDS[-1]


def _series(merged: Merged, end: int, now: float) -> dict[str, list[Any]]:
    """One series over the whole span, a point per bucket (zeros where none came)."""
    out: dict[str, list[Any]] = {"t": [], "requests": [], "errors": [], "rps": [], "error_rate": [],
                                 "p50_ms": [], "p99_ms": []}
    for bucket in range(end - SLOTS + 1, end + 1):
        requests, errors, hist = merged.get(bucket, (0, 0, {}))
        start = bucket * WIDTH
        # The current bucket is still filling: its rate is over the time it has run.
        seconds = min(WIDTH, max(1.0, now - start)) if bucket == end else WIDTH
        p50, p99 = percentile(hist, 0.5), percentile(hist, 0.99)
        out["t"].append(start)
        out["requests"].append(requests)
        out["errors"].append(errors)
        out["rps"].append(round(requests / seconds, 3))
        out["error_rate"].append(round(errors / requests, 4) if requests else 0.0)
        out["p50_ms"].append(None if p50 is None else round(p50 * 1000, 3))
        out["p99_ms"].append(None if p99 is None else round(p99 * 1000, 3))
    return out


def view(merged: dict[str, Any], group: str | None = None, groups: Iterable[str] = (),
         now: float | None = None) -> dict[str, Any]:
    """What /admin/history answers: the total and each group (`groups`, the configured
    ones, plus any with requests) as series over the last 15 minutes; with `group`, that
    group alone beside the total. Rates per second, error rate 0..1, latencies in ms."""
    now = time.time() if now is None else now
    end = merged["end"]
    names = sorted(set(groups) | set(merged["groups"])) if group is None else [group]
    return {
        "width": WIDTH, "span": SPAN, "end": (end + 1) * WIDTH, "group": group,
        "total": _series(merged["total"], end, now),
        "groups": {g: _series(merged["groups"].get(g, {}), end, now) for g in names},
    }
