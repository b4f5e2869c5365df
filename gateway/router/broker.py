"""The router process: a ZeroMQ ROUTER that forwards frame batches between
workers by destination and keeps the shard table.

Workers announce themselves every HEARTBEAT_INTERVAL; the router broadcasts
the table as often, which is also its own heartbeat. A worker that stops
announcing (or comes back with a new pid) is reported LOST to every other
worker, so requests waiting on it fail at once instead of timing out.

A batch for a worker whose queue is at its high-water mark is an overload,
not a loss: it goes back to its sender as FULL (whose requests in it fail
with 503 `overloaded`), and the channel between the two workers stays open.
LOST is for a destination the router cannot reach at all.

With `cluster` set the router is also this node's link to the other nodes
(`cluster.py`): a destination "NODE/wI" goes to that node's router, and the
table the workers get also holds the other nodes' workers.
"""
from __future__ import annotations

import logging
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

import orjson
import zmq
from setproctitle import setproctitle

from gateway.logs import setup_logging
from gateway.router import envelope as env
from gateway.router.shard_table import InProcessShardTable, ShardTable

if TYPE_CHECKING:
    from gateway.cluster.config import ClusterSettings
    from gateway.router.cluster import Cluster

__all__ = ["Broker", "router_main", "EXIT_BOOT_ERROR"]

log = logging.getLogger("gateway.router")

# A router that cannot bind stops the gateway (the supervisor does not respawn it in a loop).
EXIT_BOOT_ERROR = 3


class Broker:
    def __init__(self, endpoint: str, table: ShardTable | None = None, hwm: int = 100_000,
                 cluster: "Cluster | None" = None) -> None:
        self.endpoint = endpoint
        self.cluster = cluster
        self.table = table or InProcessShardTable()
        self.hwm = hwm
        self.running = True
        self.draining = False  # SIGUSR1: the supervisor is stopping this node (see Cluster.drain)
        self.forwarded = 0
        self.unroutable = 0
        self.overloaded = 0
        self._full_logged = 0.0  # a full queue is logged at most once a second (with the count)
        self._full_since_log = 0
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._pids: dict[bytes, int] = {}
        self._stopping: set[bytes] = set()  # workers that announced they are shutting down

    def bind(self) -> None:
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise, never vanish
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a respawned worker takes over its identity
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        self._sock = sock  # kept before the bind: destroy() closes it however the bind ends
        sock.bind(self.endpoint)
        self._poller.register(sock, zmq.POLLIN)
        log.info("router listening", extra={"endpoint": self.endpoint})
        if self.cluster is not None:
            self.cluster.bind(self._ctx, self._poller, self._send, lambda: [w.encode() for w in self.table.snapshot()],
                              self.refused)

    def stop(self, *_: object) -> None:
        self.running = False

    def drain(self, *_: object) -> None:
        self.draining = True  # acted on in the loop, not in the signal handler

    def _send(self, msg: list[bytes]) -> bool | None:
        """True when queued; None when the destination's queue is full (never
        block everyone for one slow worker); False when it is unreachable."""
        try:
            self._sock.send_multipart(msg, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            raise

    def _lost(self, worker: bytes) -> None:
        self._pids.pop(worker, None)
        self.table.remove(worker.decode())
        for other in self.table.snapshot():
            self._send(env.to_worker(other.encode(), env.ROUTER_ID, env.LOST, worker))
        if self.cluster is not None:
            self.cluster.worker_lost(worker)

    def refused(self, dest: bytes) -> None:
        """A batch for `dest` met a full queue (here, on a peer link, or at its node): counted,
        and logged at most once a second."""
        self.overloaded += 1
        self._full_since_log += 1
        if time.monotonic() - self._full_logged >= 1.0:
            log.warning("worker queue full: batches refused", extra={
                "worker": dest.decode(errors="replace"), "refused": self._full_since_log})
            self._full_logged, self._full_since_log = time.monotonic(), 0

    def _route(self, src: bytes, kind: bytes, dest: bytes, payload: bytes) -> bool | None:
        if env.split_remote(dest) is None:
            return self._send(env.to_worker(dest, src, kind, payload))
        # A worker of another node: only a node of a fleet reaches one.
        return self.cluster.forward(src, kind, dest, payload) if self.cluster is not None else False

    def handle(self, msg: list[bytes]) -> None:
        src, kind, dest, payload = env.from_worker(msg)
        if kind == env.FRAMES or kind == env.COMMAND:
            sent = self._route(src, kind, dest, payload)
            if sent:
                self.forwarded += 1
            elif sent is None:
                if kind == env.FRAMES:  # its requests fail with 503; a COMMAND is only dropped
                    self._send(env.to_worker(src, dest, env.FULL, payload))
                self.refused(dest)
            else:
                self.unroutable += 1
                self._send(env.to_worker(src, env.ROUTER_ID, env.LOST, dest))
        elif kind == env.ROLLOUTS:
            if self.cluster is not None:  # one host: worker 0 tells the others itself
                self.cluster.fleet.put_rollouts(payload, int(dest or b"0"))
        elif kind == env.ANNOUNCE:
            info = orjson.loads(payload)
            pid = info.get("pid")
            old_pid = self._pids.get(src)
            if old_pid is not None and old_pid != pid:
                log.warning("worker restarted", extra={"worker": src.decode(), "old_pid": old_pid, "pid": pid})
                self._lost(src)
            self._pids[src] = pid
            if old_pid != pid and self.cluster is not None and self.cluster.fleet.rollouts is not None:
                # A new (or respawned) worker: the fleet's rollout book before it serves long.
                self._send(env.to_worker(src, env.ROUTER_ID, env.ROLLOUTS, self.cluster.fleet.rollouts))
            if info.get("stopping"):
                self._stopping.add(src)
            else:
                self._stopping.discard(src)
            if self.table.update(src.decode(), info, time.monotonic()):
                self.broadcast()

    def tick(self) -> None:
        for gone in self.table.expire(time.monotonic(), env.HEARTBEAT_INTERVAL * env.HEARTBEAT_LIVENESS):
            if gone.encode() in self._stopping:  # it said it was shutting down: an expected silence
                log.info("worker stopped", extra={"worker": gone})
            else:
                log.warning("worker lost", extra={"worker": gone})
            self._stopping.discard(gone.encode())
            self._lost(gone.encode())
        if self.cluster is not None:
            self.cluster.tick(self.table.snapshot())
        self.broadcast()

    def broadcast(self) -> None:
        snapshot = self.table.snapshot()
        cluster = self.cluster
        # With a fleet the rows of other nodes' workers ("B/wI") go with this node's.
        payload = orjson.dumps({**snapshot, **cluster.rows} if cluster is not None else snapshot)
        fleet = cluster.view() if cluster is not None else None
        for worker in snapshot:
            self._send(env.to_worker(worker.encode(), env.ROUTER_ID, env.TABLE, payload))
            if fleet is not None:
                self._send(env.to_worker(worker.encode(), env.ROUTER_ID, env.FLEET, fleet))

    def run(self) -> None:
        next_tick = time.monotonic()
        while self.running:
            wait_ms = max(0, int((next_tick - time.monotonic()) * 1000))
            events = dict(self._poller.poll(wait_ms))
            if self.draining and self.cluster is not None and self.cluster.state != "draining":
                self.cluster.drain()
                self.broadcast()
            if self.cluster is not None and events and self.cluster.poll(events):
                self.broadcast()
            if self.cluster is not None and (book := self.cluster.take_rollouts()) is not None:
                for worker in self.table.snapshot():
                    self._send(env.to_worker(worker.encode(), env.ROUTER_ID, env.ROLLOUTS, book))
            if self._sock in events:
                # Drain what is there, bounded, so ticks still happen under load.
                for _ in range(10_000):
                    try:
                        msg = self._sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self.handle(msg)
                    except (ValueError, orjson.JSONDecodeError) as exc:
                        log.warning("dropped a bad envelope: %s", exc)
            if time.monotonic() >= next_tick:
                self.tick()
                next_tick = time.monotonic() + env.HEARTBEAT_INTERVAL

    def destroy(self) -> None:
        if self.cluster is not None:
            self.cluster.close()  # leaves the fleet first: the others stop sending at once
        if self._sock is not None:
            self._sock.close(0)
        if self._ctx is not None:
            self._ctx.term()


def router_main(endpoint: str, log_level: str, log_format: str, cluster: "ClusterSettings | None" = None,
                listener: socket.socket | None = None) -> None:
    """Entry point of the router process; with `cluster`, this node's link to the fleet
    (`listener`: the claimed peer port, listening)."""
    setproctitle("tunnel-gateway: router")
    setup_logging(log_level, log_format, prefix={"process": "router"})
    node = None
    if cluster is not None:
        # Only a node of a fleet loads the registry (redis) and the peer links.
        from gateway.router.cluster import Cluster

        node = Cluster(cluster, listener)
    broker = Broker(endpoint, cluster=node)
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGUSR1, broker.drain)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        broker.bind()
    except zmq.ZMQError as exc:
        log.error("router could not bind: %s", exc, extra={"endpoint": endpoint})
        broker.destroy()
        sys.exit(EXIT_BOOT_ERROR)
    try:
        broker.run()
    finally:
        broker.destroy()
