"""scripts/bench.py --fleet (issue 18): the cross-node hop beside a local request and a
cross-worker one, in one run, with CPU a request of every gateway process and the client.

  fleet_local         one gateway (1 worker), the client on it, requests to it
  fleet_cross_worker  one gateway (2 workers, force_cross_worker): every request through its router
  fleet_cross_node    nodes a (127.0.0.2) and b (127.0.0.3), 1 worker each, one redis-server;
                      the client on a only (--no-learn-fleet), requests to b: every request goes
                      b's worker -> b's router -> a's router -> a's worker -> client and back

The gateway CPU of the cross-node row is both nodes' (supervisor, router and worker of each);
Redis is off the request path (each node routes from its own copy of the fleet) and is not
counted. Target: a cross-node request costs at most TARGET x the CPU (gateway + client) of a
local one."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_stack import BenchStack, ProcGroup, cpu_seconds_of, free_port, get_json
from redis_process import RedisServer, RedisUnavailable

if TYPE_CHECKING:
    from bench import Bench, Row, Scenario

__all__ = ["NODE_A", "NODE_B", "TARGET", "ProcGroups", "run_fleet", "summary"]

NODE_A, NODE_B = "127.0.0.2", "127.0.0.3"
TARGET = 1.5  # cross-node CPU a request / local CPU a request, at most
METRICS_INTERVAL = 1.2  # a worker samples its counters into /metrics once a second (gateway/workers/worker.py)
PREFIX = "bench"  # cluster_prefix of the run's nodes
LOCAL, CROSS_WORKER, CROSS_NODE = "fleet_local", "fleet_cross_worker", "fleet_cross_node"


class ProcGroups:
    """Several process groups measured as one (both nodes of a fleet); each reading of the CPU
    also keeps each process's, by node and title ("a router", "b worker 0"), for `by_process`."""

    def __init__(self, **groups: ProcGroup | None) -> None:
        self.groups = {name: g for name, g in groups.items() if g is not None}
        self.readings: list[dict[str, float]] = []

    def pids(self) -> list[int]:
        return [pid for g in self.groups.values() for pid in g.pids()]

    def cpu_seconds(self) -> float:
        reading: dict[str, float] = {}
        for name, group in self.groups.items():
            for pid in group.pids():
                title = proc_title(pid).removeprefix("tunnel-gateway: ") or str(pid)
                key = f"{name} {title}"
                reading[key] = reading.get(key, 0.0) + cpu_seconds_of(pid)
        self.readings.append(reading)
        return sum(reading.values())

    def by_process(self, requests: int) -> dict[str, float]:
        """CPU microseconds a request of each process between the last two readings."""
        before, after = self.readings[-2:]
        return {k: round((v - before.get(k, 0.0)) / max(requests, 1) * 1e6, 1) for k, v in sorted(after.items())}


def proc_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def metric(admin_url: str, name: str, labels: str = "") -> float:
    """The sum of the samples of `name` on a gateway's /metrics whose labels contain `labels`."""
    import urllib.request

    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*{labels}[^}}]*}})? (\S+)$", text, re.M))


def cpu_us(row: Row) -> float | None:
    """CPU microseconds a request, the gateway's processes and the client's together."""
    if row.cpu_gateway_per_1k is None or row.cpu_client_per_1k is None:
        return None
    return round((row.cpu_gateway_per_1k + row.cpu_client_per_1k) * 1000, 1)


def cpu_us_client(row: Row) -> float | None:
    return None if row.cpu_client_per_1k is None else round(row.cpu_client_per_1k * 1000, 1)


def run_fleet(bench: Bench, scenario: Scenario) -> None:
    """The three rows (module docstring); the cross-node row says how many batches crossed."""
    stack: BenchStack = bench.stack
    try:
        redis = RedisServer(bench.tmp / "redis")
    except RedisUnavailable as exc:
        print(f"bench: --fleet: {exc}; skipped", file=sys.stderr)
        return
    rows: dict[str, Row] = {}
    for label, workers, cross in ((LOCAL, 1, False), (CROSS_WORKER, 2, True)):
        stack.stop_tunnel()
        stack.start_gateway(workers, force_cross_worker=cross)
        stack.start_client(connections=4 if workers > 1 else 2)
        bench.warm_up(stack.url)
        frames_before = stack.cross_frames()
        rows[label] = row = bench.measure(scenario, "ingress", stack.url, label=label)
        row.extra["cross_frames"] = stack.cross_frames() - frames_before
    stack.stop_tunnel()
    with redis:
        rows[CROSS_NODE] = measure_cross_node(bench, scenario, stack, redis.url)
    local = rows[LOCAL]
    for label in (CROSS_WORKER, CROSS_NODE):
        row = rows[label]
        if local.result.rps:
            row.ratio, row.ratio_to = round(row.result.rps / local.result.rps, 3), LOCAL
    base = cpu_us(local)
    for row in rows.values():
        row.extra["cpu_us_per_request"] = us = cpu_us(row)
        if row is not local and us is not None and base:
            row.extra["cpu_vs_local"] = round(us / base, 3)
            row.extra["hop_cpu_us_per_request"] = round(us - base, 1)


def measure_cross_node(bench: Bench, scenario: Scenario, stack: BenchStack, redis_url: str) -> Row:
    a, b = stack.sibling(NODE_A), stack.sibling(NODE_B)
    try:
        for node, node_id in ((a, "a"), (b, "b")):
            node.start_gateway(1, name=f"gateway-{node_id}", cluster=redis_url, cluster_prefix=PREFIX,
                               node_id=node_id, peer_port=free_port())
        a.start_client(2, extra=["--no-learn-fleet"])  # on node a only, whatever the fleet says

        def b_sees_the_client() -> bool:
            nodes = get_json(f"{b.admin_url}/admin/cluster")["nodes"]
            return any(n["node_id"] == "a" and n["state"] == "serving" and n["groups"] == {"bench": 2} for n in nodes)

        stack.wait_ready("node b to see the client on node a", (a.gateway, b.gateway, a.client), b_sees_the_client)
        bench.warm_up(b.url)

        def counted() -> tuple[float, float, float]:
            time.sleep(METRICS_INTERVAL)  # /metrics shows what a worker sampled last
            return (metric(b.admin_url, "tunnel_cross_node_batches_total", 'flow="out"'),
                    metric(a.admin_url, "tunnel_cross_node_batches_total", 'flow="in"'), b.cross_frames())

        before = counted()
        gateways = ProcGroups(a=a.gateway, b=b.gateway)
        row = bench.measure(scenario, "ingress", b.url, label=CROSS_NODE,
                            groups={"gateway": gateways, "client": a.client})
        out_b, in_a, frames_b = (after - was for after, was in zip(counted(), before))
        row.extra.update(cross_node_batches_out_b=int(out_b), cross_node_batches_in_a=int(in_a),
                         cross_frames=int(frames_b), cpu_us_by_process=gateways.by_process(row.result.requests))
        print(f"  cross-node: tunnel_cross_node_batches_total {int(out_b)} out of node b, {int(in_a)} into node a; "
              f"{int(frames_b)} batches over b's router link (cross_frames); {row.result.requests} requests",
              file=sys.stderr, flush=True)
        return row
    finally:
        b.stop_tunnel()
        a.stop_tunnel()


def summary(rows: list[Row]) -> list[str]:
    """Lines under the table: CPU a request of each fleet row and the cross-node verdict."""
    fleet = {r.scenario: r for r in rows if r.scenario in (LOCAL, CROSS_WORKER, CROSS_NODE)}
    if not fleet:
        return []
    out = ["fleet: CPU a request, gateway (every process of every node) + client:"]
    for label, row in fleet.items():
        e: dict[str, Any] = row.extra
        vs = f"  {e['cpu_vs_local']:.2f}x local (+{e['hop_cpu_us_per_request']} us)" if "cpu_vs_local" in e else ""
        crossed = (f"  [cross-node batches: {e['cross_node_batches_out_b']} out of b, {e['cross_node_batches_in_a']} "
                   f"into a, for {row.result.requests} requests]"
                   if label == CROSS_NODE else "")
        out.append(f"  {label:<20} {e.get('cpu_us_per_request')} us{vs}{crossed}")
    if node := fleet.get(CROSS_NODE):
        procs = node.extra.get("cpu_us_by_process", {})
        out.append("  fleet_cross_node by process (us a request): "
                   + ", ".join(f"{k} {v}" for k, v in procs.items() if v) + f", client {cpu_us_client(node)}")
    return out
