"""The agent: keeps N tunnel connections to the gateway and serves what
arrives on them. Each connection is its own stream with its own back-off;
losing one does not interrupt the others. With several gateway nodes the
connections are spread over them (gateway/client/fleet.py decides, one move
at a time; gateway/client/connection.py moves), and on one gateway over its
workers (gateway/client/worker_spread.py)."""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import Sequence

import orjson

from gateway.balance import prefer_filling
from gateway.client.config import ClientConfig
from gateway.client.connection import Connection
from gateway.client.fleet import Move, NodeSet, home_offset
from gateway.client.inspector import capture, finish
from gateway.client.quick import Console
from gateway.client.worker_spread import Seat, WorkerSpread
from gateway.groupconfig import check_allowed, group_config_from_json
from gateway.heap import refreeze_soon
from gateway.inspection import Inspector
from gateway.settings import ConfigError
from gateway.dispatch import RuleDispatcher
from gateway.http.upstream import UpstreamClients
from gateway.tunnel.exchange import InboundExchange
from gateway.tunnel.stream import TunnelStream

__all__ = ["Agent"]

log = logging.getLogger("gateway.client")

# How often the spread of the connections over the nodes is checked (and one move made).
REBALANCE_EVERY = 1.0

class Agent:
    def __init__(self, config: ClientConfig, upstreams: UpstreamClients) -> None:
        self.config = config
        self._group, self._client_id = config.group, config.client_id  # read a request: kept
        self.upstreams = upstreams
        self.dispatcher: RuleDispatcher | None = None
        self.config_version = ""
        self.last_rejection = ""
        self.fatal = ""  # why the agent stopped by itself (the process exits 1)
        self._stop: asyncio.Event | None = None
        self.instance = os.urandom(8).hex()  # this process: its HELLOs tell its own moves from a duplicate's
        self.console: Console | None = None  # `tunnel-client http`: the public URL, a line a request
        self.inspector: Inspector | None = None  # the last requests served, for the status port's Inspector
        self.connections = [Connection(self, i) for i in range(config.connections)]
        self.nodes = NodeSet(config.server.split(","), offset=home_offset(config.group, config.client_id))
        self.worker_spread = WorkerSpread()
        self._rr = itertools.count()
        self._rebalance_now = asyncio.Event()

    async def handle(self, ex: InboundExchange) -> None:
        # The dispatcher is read once: a config swap does not touch running requests.
        dispatcher = self.dispatcher
        if dispatcher is None:
            ex.reset("upstream_unavailable", "client has no config yet")
            return
        if self.console is None and self.inspector is None:
            await dispatcher.handle(ex)
            return
        started = time.monotonic()
        cap = capture(self.inspector, ex, self._group, self._client_id) if self.inspector is not None else None
        try:
            await dispatcher.handle(ex)
        finally:
            if cap is not None:
                finish(cap, ex, started)
            if self.console is not None:
                self.console.request(ex.head.method, ex.head.path.partition("?")[0], ex.status,
                                     time.monotonic() - started)

    def apply_config(self, version: str, raw: bytes, *, cache: bool = True) -> str:
        """Swap in a group config from the gateway atomically: requests in
        flight finish on the old rules. A bad one keeps the old; returns the
        error ("" when applied)."""
        if version == self.config_version and self.dispatcher is not None:
            return ""
        try:
            group = group_config_from_json(raw, f"gateway config {version}")
            check_allowed(group.upstreams, self.config.allow_upstreams, f"gateway config {version}")
        except ConfigError as exc:
            log.error("config from gateway rejected: %s", exc, extra={"config_version": version})
            return str(exc)
        old = self.dispatcher
        self.dispatcher = RuleDispatcher(group.rules, group.upstreams, self.upstreams, self.report_health,
                                         checker=f"tunnel-client {self.config.client_id}")
        self.dispatcher.start()
        if old is not None:
            old.close()
            refreeze_soon()  # the old rules' objects may have been frozen (gateway/heap.py)
        self.config_version = version
        log.info("config applied", extra={"config_version": version, "rules": len(group.rules)})
        if cache and self.config.config_cache:
            self._save_cache(version, raw)
        self.report_health()
        return ""

    def _save_cache(self, version: str, raw: bytes) -> None:
        """Keep the last config on disk so a restarted client serves with it until the gateway answers."""
        path = self.config.config_cache
        try:
            tmp = f"{path}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(orjson.dumps({"config_version": version, "config": orjson.loads(raw)}))
            os.replace(tmp, path)
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("cannot write config cache %s: %s", path, exc)

    def load_cache(self) -> None:
        path = self.config.config_cache
        if not path or not os.path.exists(path):
            return
        try:
            with open(path, "rb") as fh:
                doc = orjson.loads(fh.read())
            self.apply_config(doc["config_version"], orjson.dumps(doc["config"]), cache=False)
            log.info("serving with the cached config until the gateway answers",
                     extra={"config_version": doc["config_version"], "file": path})
        except (OSError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            log.warning("ignoring config cache %s: %s", path, exc)

    def unhealthy_upstreams(self) -> list[str]:
        return self.dispatcher.unhealthy_upstreams() if self.dispatcher is not None else []

    def report_health(self) -> None:
        """Tell the gateway now, not at the next heartbeat."""
        for stream in self.streams():
            if not stream.closed:
                stream.send_ping()

    def pick_stream(self) -> TunnelStream | None:
        """A usable stream for an egress request: the one already filling its
        next gRPC message while it has room, else round robin over connections."""
        usable = [c.stream for c in self.connections if c.stream is not None and not c.stream.draining
                  and not c.stream.closed]
        if not usable:
            return None
        return prefer_filling(usable, lambda s: s) or usable[next(self._rr) % len(usable)]

    def streams(self) -> list[TunnelStream]:
        """Every live stream, draining ones included."""
        out = []
        for c in self.connections:
            if c.stream is not None:
                out.append(c.stream)
            out.extend(c.draining)
        return out

    @property
    def connected(self) -> int:
        return sum(1 for c in self.connections if c.stream is not None)

    def fail(self, message: str) -> None:
        """Stop every connection for an error no retry mends; the process exits 1."""
        if not self.fatal:
            self.fatal = message
            log.error(message, extra={"group": self.config.group})
        if self._stop is not None:
            self._stop.set()

    def placed(self) -> dict[int, str | None]:
        """Each connection's node (None: not connected)."""
        return {c.index: c.node for c in self.connections}

    def seats(self) -> dict[int, Seat | None]:
        """Each connection's gateway and worker (None: not connected)."""
        return {c.index: c.seat for c in self.connections}

    def _next_move(self) -> Move | None:
        """Over the nodes first; then, on one node, over its workers."""
        move = self.nodes.plan_move(self.placed())
        if move is not None or not self.config.spread_workers:
            return move
        index = self.worker_spread.plan(self.seats(), sum(c.connects - c.moves for c in self.connections))
        node = None if index is None else self.connections[index].node
        return None if node is None else Move(index, node, "spread over the gateway's workers")  # type: ignore[arg-type]

    def learn(self, nodes: Sequence[str], via: str) -> None:
        """The serving nodes a gateway named (WELCOME, FLEET): new ones get connections soon."""
        if not self.config.learn_fleet:
            return
        new = self.nodes.learn(nodes)
        if new:
            log.info("gateway nodes learned", extra={"nodes": list(nodes), "new": new, "via": via})
            self._rebalance_now.set()

    async def _rebalance(self, stop: asyncio.Event) -> None:
        """Keep the connections spread over the nodes and their workers: one move at a
        time, each made before it breaks."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(self._rebalance_now.wait(), REBALANCE_EVERY)
            except asyncio.TimeoutError:
                pass
            self._rebalance_now.clear()
            move = self._next_move()
            if move is None or stop.is_set():
                continue
            conn = self.connections[move.index]
            if conn.stream is None:
                continue
            conn.request_move(move.node, move.why)
            try:
                # Bounded: a move is one handshake (connect_timeout) and a swap.
                await asyncio.wait_for(conn.move_done.wait(), self.config.connect_timeout + 5)
            except asyncio.TimeoutError:
                log.warning("a connection move did not finish in time", extra={"connection": move.index})

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set: by a signal, or by `fail`."""
        self._stop = stop
        rebalance = asyncio.get_running_loop().create_task(self._rebalance(stop))
        try:
            await asyncio.gather(*(c.run_forever(stop) for c in self.connections))
        finally:
            rebalance.cancel()
            await asyncio.gather(rebalance, return_exceptions=True)
