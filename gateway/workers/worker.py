"""A gateway worker: one uvloop event loop serving the HTTP entry, the tunnel
endpoint and the admin port, on ports shared with other workers (SO_REUSEPORT).
With more than one worker it links to the router to reach other workers'
client streams.

`Worker.__init__` does nothing to the process; `init_process` sets it up.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Coroutine

from gateway.config import GatewayConfig, load_gateway_config
from gateway.grpc_io import choose_grpc_io
from gateway.ids import RequestIds, gateway_prefix, new_instance_id
from gateway.logs import setup_logging
from gateway.router.envelope import worker_identity
from gateway.rules import first_match
from gateway.settings import ConfigError
from gateway.workers.balancer import Balancer, Candidate

__all__ = ["Worker", "worker_main", "EXIT_BOOT_ERROR"]

log = logging.getLogger("gateway.worker")

# A worker that cannot start (port taken, bad config) exits with this; the
# supervisor stops instead of respawning it in a loop.
EXIT_BOOT_ERROR = 3


class Worker:
    def __init__(
        self,
        config: GatewayConfig,
        index: int = 0,
        instance: str | None = None,
        router_endpoint: str | None = None,
        overrides: argparse.Namespace | None = None,
        workers: int = 1,
    ) -> None:
        self.config = config
        self.index = index
        self.instance = instance or new_instance_id()
        self.router_endpoint = router_endpoint
        self.overrides = overrides
        self.stopping = False
        self.started = time.monotonic()
        self.started_at = time.time()
        self.link = None
        self.workers = workers
        self._gates: dict = {}
        self._tasks: set[asyncio.Task] = set()

    def init_process(self) -> None:
        from setproctitle import setproctitle

        setproctitle(f"tunnel-gateway: worker {self.index}")
        setup_logging(self.config.log_level, self.config.log_format, prefix={"worker": self.index})
        choose_grpc_io(self.config.grpc_event_engine)  # before serve() imports grpc

    def run(self) -> None:
        import uvloop

        self.init_process()
        try:
            uvloop.run(self.serve())
        except OSError as exc:
            log.error("worker could not start: %s", exc)
            sys.exit(EXIT_BOOT_ERROR)

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """Start a background task this worker owns (cancelled on shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- request handlers that read the current config ------------------------

    async def handle_egress(self, ex) -> None:
        """A request a client sent up its tunnel: serve it by the forward rules."""
        await self.egress.handle(ex)

    async def serve_remote(self, ex) -> None:
        """A request another worker sent: put it on one of our client streams."""
        from gateway.tunnel.proxy import relay_exchange

        group = ex.head.group
        candidates = self.candidates(group, local_only=True)
        # The origin chose the client (policy, health); keep to it while it is here.
        chosen = [c for c in candidates if c.client_id == ex.head.target_client] or candidates
        pick = self.balancer.pick(group, "round_robin", chosen)
        if pick is None:
            ex.reset("no_client_available", f"worker {self.index} holds no stream of group {group!r}")
            return
        await relay_exchange(ex, pick.stream)

    def candidates(self, group: str, local_only: bool = False) -> list:
        """Streams of `group` this worker could send a request to: its own, then other workers'."""
        out = [Candidate(s.peer_id, self.index, s.inflight, s.peer_unhealthy, s) for s in self.registry.usable(group)]
        link = self.link
        if not local_only and link is not None and link.router_ok:
            for info in link.table.values():
                if info["worker"] == self.index:
                    continue
                for c in info["clients"]:
                    if c["group"] == group and not c["draining"]:
                        out.append(Candidate(c["client_id"], info["worker"], c["pending"] + c["serving"],
                                             frozenset(c.get("unhealthy", ()))))
        return out

    def choose_stream(self, spec, *, authority: str, path: str, method: str, headers, key: str | None):
        """(stream, client id) for a request to group `spec`: by its policy, its
        clients' health, preferring streams this worker owns; None if there is none."""
        candidates = self.candidates(spec.name)
        upstream = None
        if any(c.unhealthy for c in candidates):
            # Which upstream the client will use, by the group's rules the gateway hands out.
            client_rule = first_match(spec.client.rules, authority, path.split("?", 1)[0], method, headers)
            upstream = client_rule.target if client_rule else None
        choice = self.balancer.pick(spec.name, spec.balance, candidates, upstream=upstream, key=key,
                                    prefer_remote=self.config.force_cross_worker)
        if choice is None:
            return None
        # A stream this worker owns, or a channel to the worker that owns the chosen one.
        return choice.stream or self.link.channel(worker_identity(choice.worker)), choice.client_id

    def limit_gate(self, kind: str, name: str, limits):
        """The live gate of a group's or a rule's limits (None when it has none)."""
        if limits.empty:
            return None
        key = (kind, name)
        gate = self._gates.get(key)
        if gate is None or gate.limits != limits:
            from gateway.limits import LimitGate

            gate = self._gates[key] = LimitGate(limits, self.workers)
        return gate

    # -- state for the router and the admin port ------------------------------

    def shard_info(self) -> dict[str, Any]:
        from gateway.tunnel.frames import HEADER_FIELDS
        from gateway.workers.admin import stream_info

        streams: dict[str, int] = self.registry.groups()
        clients = [stream_info(s, self.index) for s in self.registry]

        link = self.link
        return {
            "worker": self.index,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime": round(time.monotonic() - self.started, 3),
            "streams": streams,
            "clients": clients,
            "pending": sum(c["pending"] for c in clients) + sum(len(ch.pending) for ch in self._channels()),
            "serving": sum(c["serving"] for c in clients) + sum(len(ch.serving) for ch in self._channels()),
            "inflight": sum(c["pending"] + c["serving"] for c in clients),
            "requests": self.http_entry.requests,
            "requests_served": sum(c["requests_originated"] for c in clients),
            "errors": self.http_entry.errors,
            "cross_frames_in": link.frames_in if link else 0,
            "cross_frames_out": link.frames_out if link else 0,
            "config_versions": self.config_versions(),
            "last_minute": self.http_entry.window.last_minute(),
            # Streams by group this worker can reach, its own and through the router.
            "sees": self.visible_streams(),
            # What frames this worker's code reads (channels to it use them; older code lacks the key).
            "capabilities": [HEADER_FIELDS],
        }

    def visible_streams(self) -> dict[str, int]:
        seen = dict(self.registry.groups())
        if self.link is not None and self.link.router_ok:
            for w, info in self.link.table.items():
                if info.get("worker") != self.index:
                    for g, n in info.get("streams", {}).items():
                        seen[g] = seen.get(g, 0) + n
        return seen

    def streams_changed(self) -> None:
        """Tell the router at once, not at the next heartbeat."""
        if self.link is not None:
            self.link.announce_soon()

    def _channels(self):
        return list(self.link.channels.values()) if self.link else []

    def run_command(self, command: dict[str, Any]) -> int:
        """Execute an admin command on this worker's streams; returns how many it touched."""
        if command.get("op") != "drain":
            return 0
        n = 0
        limit = command.get("limit")
        for s in list(self.registry):
            if s.draining:
                continue
            if "client_id" in command and s.peer_id != command["client_id"]:
                continue
            if "connection" in command and s.label != command["connection"]:
                continue
            if limit is not None and n >= limit:
                break
            self.spawn(s.goaway("drain", self.config.shutdown_grace))
            n += 1
        if n:
            self.streams_changed()
        log.info("drained streams", extra={"count": n, "command": command})
        return n

    def reload(self) -> None:
        """Re-read the config file; a bad one is rejected and the old one stays."""
        from gateway.tunnel import frames
        from gateway.tunnel.dispatch import RuleDispatcher

        try:
            new = load_gateway_config(self.config.path, self.overrides)
        except ConfigError as exc:
            log.error("config reload rejected: %s", exc, extra={"file": exc.file, "key": exc.key})
            return
        old = self.config
        self.config = new
        old_versions = {g: spec.client.version for g, spec in old.groups.items()}
        self.metrics.set_config_versions(self.config_versions(), old_versions)
        self.egress.close()
        self.egress = RuleDispatcher(new.forward, new.upstreams, self.upstreams)
        self.egress.start()
        pushed = 0
        for s in list(self.registry):
            spec = new.groups.get(s.group)
            if spec is None:
                self.spawn(s.goaway("group_removed", new.shutdown_grace))
            elif spec.client.version != s.config_version:
                # The client answers with the version it applied (see TunnelEndpoint).
                s.push(frames.config(spec.client.version, spec.client.to_json()))
                pushed += 1
        log.info("config reloaded", extra={"file": new.path, "pushed": pushed})

    def config_versions(self) -> dict[str, str]:
        return {g: spec.client.version for g, spec in self.config.groups.items()}

    async def _sample_metrics(self) -> None:
        while True:
            link = self.link
            self.metrics.sample(
                str(self.index), sum(s.inflight for s in self.registry), self.registry.groups(),
                link.frames_in if link else 0, link.frames_out if link else 0,
            )
            await asyncio.sleep(1.0)

    # -- serving ---------------------------------------------------------------

    async def serve(self) -> None:
        # grpc is imported here, in the worker, never in a parent process.
        import grpc.aio
        from aiohttp import web

        from gateway.tunnel.dispatch import RuleDispatcher
        from gateway.tunnel.entry import entry_runner
        from gateway.tunnel.proxy import UpstreamClients
        from gateway.tunnel.transport import grpc_options, tunnel_handler
        from gateway.workers.admin import admin_app
        from gateway.workers.http_entry import HttpEntry
        from gateway.workers.registry import StreamRegistry
        from gateway.workers.tunnel_endpoint import TunnelEndpoint

        cfg = self.config
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

        from gateway.metrics import Metrics
        from gateway.observe import AccessLog

        self.ids = RequestIds(gateway_prefix(self.instance, self.index))
        self.registry = StreamRegistry()
        self.upstreams = UpstreamClients()
        self.egress = RuleDispatcher(cfg.forward, cfg.upstreams, self.upstreams)
        self.egress.start()
        self.metrics = Metrics()
        self.metrics.set_config_versions(self.config_versions())
        self.access_log = AccessLog(cfg.access_log)

        self.balancer = Balancer()
        self.http_entry = HttpEntry(self, access_log=self.access_log, metrics=self.metrics)
        self.spawn(self._sample_metrics())
        self.endpoint = TunnelEndpoint(self)
        if self.router_endpoint:
            from gateway.workers.router_link import RouterLink

            self.link = RouterLink(self, self.router_endpoint)
            await self.link.start()

        max_message = cfg.max_batch_bytes * 2 + cfg.max_header_bytes + cfg.chunk_size + (1 << 20)
        server = grpc.aio.server(
            options=grpc_options(max_message, int(cfg.heartbeat_interval * 1000), server=True),
        )
        server.add_generic_rpc_handlers([tunnel_handler(self.endpoint.serve)])
        address = f"{cfg.host}:{cfg.tunnel_port}"
        try:
            if cfg.tls_cert:
                from gateway.tls import server_credentials

                server.add_secure_port(address, server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca))
            else:
                server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind tunnel port {cfg.host}:{cfg.tunnel_port}: {exc}") from None
        grpc_server = None
        if cfg.grpc_port:
            from gateway.tunnel.grpc_bridge import MAX_MESSAGE
            from gateway.workers.grpc_entry import GrpcEntry

            grpc_server = grpc.aio.server(options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ])
            self.grpc_entry = GrpcEntry(self)
            grpc_server.add_generic_rpc_handlers([self.grpc_entry])
            grpc_address = f"{cfg.host}:{cfg.grpc_port}"
            try:
                if cfg.http_tls:
                    from gateway.tls import server_credentials

                    grpc_server.add_secure_port(grpc_address, server_credentials(cfg.tls_cert, cfg.tls_key))
                else:
                    grpc_server.add_insecure_port(grpc_address)
            except RuntimeError as exc:
                raise OSError(f"cannot bind gRPC entry {grpc_address}: {exc}") from None
        await server.start()
        if grpc_server is not None:
            await grpc_server.start()

        runner = entry_runner(self.http_entry.handle, cfg.max_header_bytes)
        await runner.setup()
        ssl_context = None
        if cfg.http_tls:
            from gateway.tls import http_ssl_context

            ssl_context = http_ssl_context(cfg.tls_cert, cfg.tls_key)
        site = web.TCPSite(runner, cfg.host, cfg.http_port, reuse_port=True, backlog=1024, ssl_context=ssl_context)
        await site.start()

        admin_runner = web.AppRunner(admin_app(self), handle_signals=False, access_log=None)
        await admin_runner.setup()
        admin_site = web.TCPSite(admin_runner, cfg.admin_host, cfg.admin_port, reuse_port=True)
        await admin_site.start()

        log.info(
            "listening",
            extra={"http_port": cfg.http_port, "tunnel_port": cfg.tunnel_port, "admin_port": cfg.admin_port},
        )
        await stop.wait()

        # Shutdown in order: stop accepting, drain streams, then end the rest.
        self.stopping = True
        grace = self.config.shutdown_grace
        log.info("shutting down", extra={"grace": grace})
        await site.stop()
        stopping = []
        if grpc_server is not None:
            # Stop taking calls; running ones get the grace period.
            stopping.append(self.spawn(grpc_server.stop(grace)))
        # server.stop closes the tunnel port now (clients reconnect to other
        # workers) and lets running streams go on for the grace period.
        grpc_stopped = self.spawn(server.stop(grace + 1))
        drains = [self.spawn(s.goaway("shutdown", grace)) for s in list(self.registry)]
        deadline = time.monotonic() + grace
        if drains:
            await asyncio.wait(drains, timeout=grace + 2)
        # Requests this worker originated (local or through other workers) finish too.
        while self.http_entry.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.wait([grpc_stopped, *stopping], timeout=grace + 2)
        await runner.cleanup()
        await admin_runner.cleanup()
        if self.link is not None:
            await self.link.stop()
        for task in list(self._tasks):
            task.cancel()
        await self.upstreams.close()
        self.access_log.close()
        log.info("stopped")


def worker_main(
    config: GatewayConfig, index: int, instance: str, router_endpoint: str | None,
    overrides: argparse.Namespace | None, workers: int = 1,
) -> None:
    """Entry point of a worker process (spawned by the supervisor)."""
    Worker(config, index, instance, router_endpoint, overrides, workers).run()
