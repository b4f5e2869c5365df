"""Prometheus metrics, with prometheus-client.

In the gateway every worker writes its samples to PROMETHEUS_MULTIPROC_DIR
(set by the supervisor before it spawns anyone), so a scrape of /metrics on
any worker adds up all of them. The tunnel client, one process, keeps them in
its own registry. Import this module only in a worker or a client process.
"""
from __future__ import annotations

import os
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess, values

from gateway.observe import AccessRecord
from gateway.quick import label_of

__all__ = ["Metrics", "render", "CONTENT_TYPE_LATEST"]


def _pid_without_a_system_call() -> Callable[[], int]:
    """The pid for prometheus-client's multiprocess values, which check it on
    every write (a fork must get its own file): os.getpid() is a system call
    each time (four a request); this one is read once and again in a forked child."""
    pid = [os.getpid()]
    os.register_at_fork(after_in_child=lambda: pid.__setitem__(0, os.getpid()))
    return lambda: pid[0]


if values.ValueClass is not values.MutexValue:  # multiprocess mode, chosen by prometheus-client at import
    # Before any metric exists: every value must share one record of its files.
    values.ValueClass = values.MultiProcessValue(process_identifier=_pid_without_a_system_call())


BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, cluster: bool = False) -> None:
        """`cluster`: this gateway is a node of a fleet (the registry's gauges exist only then)."""
        kw = {} if registry is None else {"registry": registry}
        self.registry = registry
        self.requests = Counter("tunnel_requests_total", "Requests by direction, group, rule and status class",
                                ["direction", "group", "rule", "status_class"], **kw)
        self.duration = Histogram("tunnel_request_duration_seconds", "Request duration at the entry",
                                  ["direction", "group"], buckets=BUCKETS, **kw)
        self.body_bytes = Counter("tunnel_body_bytes_total", "Body bytes through the entry (in: from the caller)",
                                  ["direction", "flow"], **kw)
        self.errors = Counter("tunnel_errors_total", "Error answers by status and reason", ["status", "reason"], **kw)
        self.inflight = Gauge("tunnel_inflight_requests", "Requests in flight on client streams",
                              ["worker"], multiprocess_mode="livesum", **kw)
        self.streams = Gauge("tunnel_streams", "Connected client streams", ["group", "worker"],
                             multiprocess_mode="livesum", **kw)
        self.cross = Counter("tunnel_cross_worker_batches_total", "Frame batches sent to or received from other workers",
                             ["worker", "flow"], **kw)
        self.config_version = Gauge("tunnel_config_version_info", "Config version of each group (value 1: current)",
                                    ["group", "version"], multiprocess_mode="livemax", **kw)
        self.connects = Counter("tunnel_client_connects_total", "Tunnel connections accepted (reconnects included)",
                                ["group"], **kw)
        self.rejections = Counter("tunnel_client_rejections_total", "Tunnel connections refused", ["reason"], **kw)
        self.dropped_connections = Counter(
            "tunnel_http_connections_dropped_total",
            "HTTP entry connections closed by the gateway: reason max_connections (refused at accept) or "
            "header_timeout (no whole request head in time)", ["entry", "reason"], **kw)
        self.admission = Counter("tunnel_admission_refused_total",
                                 "Tunnel connections refused by admission (rate or count bounds)", ["reason"], **kw)
        self.cross_node = Counter("tunnel_cross_node_batches_total",
                                  "Frame batches sent to or received from workers of other gateway nodes (a fleet)",
                                  ["worker", "flow"], **kw)
        self.rollouts = Counter("tunnel_rollouts_total", "Staged config rollouts by group and event: started, "
                                "promoted, rolling_back, rolled_back, halted, replaced", ["group", "event"], **kw)
        self.registry_up = self.cluster_nodes = None
        if cluster:
            # Every worker hears the same from the router: the freshest value of a live worker is the node's.
            self.registry_up = Gauge("tunnel_cluster_registry_up", "The fleet registry (Redis) answers: 1, or 0",
                                     multiprocess_mode="livemostrecent", **kw)
            self.cluster_nodes = Gauge("tunnel_cluster_nodes", "Nodes of the fleet this node knows, itself included",
                                       ["state"], multiprocess_mode="livemostrecent", **kw)
        self._totals_seen: dict[Counter, tuple[int, int]] = {}  # running totals at the last sample, by counter
        self._children: dict[tuple, object] = {}  # (metric, labels) -> child
        self._pairs: dict[tuple, tuple] = {}
        self._stream_labels: set[tuple[str, str]] = set()

    def observe(self, rec: AccessRecord) -> None:
        # Every request: its two children in one lookup.
        key = (rec.direction, rec.group, rec.rule, rec.status // 100)
        pair = self._pairs.get(key)
        if pair is None:
            group = label_of(rec.group)
            rule = "quick" if group == "quick" else rec.rule  # quick routes are per name: one series
            if group == "quick":  # a quick name's own key would grow the memo without bound
                key = (rec.direction, group, rule, rec.status // 100)
                pair = self._pairs.get(key)
            if pair is None:
                pair = self._pairs[key] = (
                    self._child(self.requests, rec.direction, group, rule, f"{rec.status // 100}xx"),
                    self._child(self.duration, rec.direction, group),
                )
        pair[0].inc()
        pair[1].observe(rec.duration)
        if rec.bytes_in:
            self._child(self.body_bytes, rec.direction, "in").inc(rec.bytes_in)
        if rec.bytes_out:
            self._child(self.body_bytes, rec.direction, "out").inc(rec.bytes_out)
        if rec.error:
            self._child(self.errors, str(rec.status), rec.error).inc()

    def _child(self, metric, *labels: str):
        """`metric.labels(*labels)`, kept: labels() costs a few microseconds a call."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def sample(self, worker: str, inflight: int, streams: dict[str, int], cross_in: int, cross_out: int) -> None:
        """Gauges and counters read from live state, once a second."""
        self.inflight.labels(worker).set(inflight)
        seen = set()
        by_label: dict[str, int] = {}
        for group, n in streams.items():
            by_label[label_of(group)] = by_label.get(label_of(group), 0) + n
        for group, n in by_label.items():
            self.streams.labels(group, worker).set(n)
            seen.add((group, worker))
        for labels in self._stream_labels - seen:
            self.streams.labels(*labels).set(0)
        self._stream_labels = seen
        self._count(self.cross, worker, cross_in, cross_out)

    def _count(self, counter: Counter, worker: str, total_in: int, total_out: int) -> None:
        """A counter by worker and flow from running totals: what they grew by since the last sample."""
        last_in, last_out = self._totals_seen.get(counter, (0, 0))
        if total_in > last_in:
            counter.labels(worker, "in").inc(total_in - last_in)
        if total_out > last_out:
            counter.labels(worker, "out").inc(total_out - last_out)
        self._totals_seen[counter] = (total_in, total_out)

    def sample_fleet(self, worker: str, node_in: int, node_out: int, fleet: dict | None) -> None:
        """Cross-node batches and (a node of a fleet) what the router last said of the fleet, once a second."""
        self._count(self.cross_node, worker, node_in, node_out)
        if self.registry_up is None or fleet is None:
            return
        self.registry_up.set(1 if fleet.get("registry_up") else 0)
        states = {"serving": 0, "draining": 0, "unreachable": 0}
        for node in fleet.get("nodes", ()):
            states[node["state"]] = states.get(node["state"], 0) + 1
        for state, n in states.items():
            self.cluster_nodes.labels(state).set(n)

    def set_config_versions(self, versions: dict[str, str], old: dict[str, str] | None = None) -> None:
        for group, version in (old or {}).items():
            if versions.get(group) != version:
                self.config_version.labels(group, version).set(0)
        for group, version in versions.items():
            self.config_version.labels(group, version).set(1)


def render(registry: CollectorRegistry | None = None) -> bytes:
    """The exposition text: every worker's samples in multiprocess mode."""
    if registry is None:
        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)
