"""A gateway worker process: one uvloop event loop serving the HTTP entry,
the gRPC entry, the tunnel endpoint and the admin port, on ports shared with
other workers (SO_REUSEPORT). With more than one worker it links to the
router to reach other workers' client streams.

This module is process life only: set up, build the parts, serve, shut down.
Where a request goes is `routing.Routing`'s.

`Worker.__init__` does nothing to the process; `init_process` sets it up.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import sys
import time
from typing import Any, Coroutine

import uvloop
from setproctitle import setproctitle

from gateway.config import GatewayConfig
from gateway.grpc_io import choose_grpc_io
from gateway.heap import refreeze_soon, settle_heap
from gateway.ids import RequestIds, gateway_prefix, new_instance_id
from gateway.logs import setup_logging

__all__ = ["Worker", "worker_main", "listen_urls", "EXIT_BOOT_ERROR"]

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
        config_handoff: str | None = None,
        workers: int = 1,
        heartbeat: Any = None,
    ) -> None:
        self._config = config
        # A shared double the supervisor watches (multiprocessing RawValue): the loop stamps it.
        self.heartbeat = heartbeat
        self.routing: Any = None
        self.index = index
        self.instance = instance or new_instance_id()
        self.router_endpoint = router_endpoint
        # Where the supervisor leaves a reloaded config (parsed once, for every worker) before SIGHUP.
        self.config_handoff = config_handoff
        self.workers = workers
        self.stopping = False
        self.started = time.monotonic()
        self.started_at = time.time()
        self.link: Any = None
        self.reloads = 0  # handoffs read
        self._tasks: set[asyncio.Task] = set()

    @property
    def config(self) -> GatewayConfig:
        """The config in force: routing's once the worker serves."""
        return self.routing.config if self.routing is not None else self._config

    def init_process(self) -> None:
        setproctitle(f"tunnel-gateway: worker {self.index}")
        setup_logging(self.config.log_level, self.config.log_format, prefix={"worker": self.index})
        choose_grpc_io(self.config.grpc_event_engine)  # before serve() imports grpc

    def run(self) -> None:
        self.init_process()
        try:
            uvloop.run(self.serve())
        except OSError as exc:
            log.error("worker could not start: %s", exc)
            sys.exit(EXIT_BOOT_ERROR)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Start a background task this worker owns (cancelled on shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def reload(self) -> None:
        """Apply the config the supervisor parsed and left in the handoff file."""
        if not self.config_handoff:
            log.warning("SIGHUP ignored: this worker has no supervisor to reload from")
            return
        try:
            new = read_handoff(self.config_handoff)
        except Exception as exc:  # whatever the file holds, the worker goes on with its config
            log.error("config reload failed: cannot read %s: %s", self.config_handoff, exc)
            return
        self.reloads += 1  # POST /admin/reload waits for it
        if new == self.config:
            return  # a signal to the whole process group: this worker has it already
        self.apply_config(new)

    def apply_config(self, new: GatewayConfig) -> None:
        """Serve by `new` from now on; requests in flight finish on the config they started with."""
        old_versions = self.routing.config_versions()
        self.rollouts.reload(self.routing.config, new)  # a group with a rollout table changes for its canary first
        pushed = self.routing.apply_config(new)
        self.endpoint.apply_config(new)
        self.metrics.set_config_versions(self.routing.config_versions(), old_versions)
        refreeze_soon()  # the old config's objects were frozen with the rest at start
        log.info("config reloaded", extra={"file": new.path, "pushed": pushed})

    async def _beat(self) -> None:
        """Tell the supervisor this loop runs: a stamp each second (a blocked or
        stopped loop stops stamping, and the supervisor kills it after worker_timeout)."""
        interval = min(1.0, self.config.worker_timeout / 4)
        while True:
            self.heartbeat.value = time.monotonic()
            await asyncio.sleep(interval)

    async def _sample_metrics(self) -> None:
        routing = self.routing
        while True:
            link = self.link
            self.metrics.sample(
                str(self.index), sum(s.inflight for s in routing.registry), routing.registry.groups(),
                link.frames_in if link else 0, link.frames_out if link else 0,
            )
            if link is not None:
                self.metrics.sample_fleet(str(self.index), link.node_in, link.node_out, link.fleet)
            await asyncio.sleep(1.0)

    # -- serving ---------------------------------------------------------------

    async def serve(self) -> None:
        # Imported here, in the worker process and after init_process chose
        # gRPC's I/O engine (grpc reads it once, at import); the supervisor
        # that spawns this process must never load grpc itself.
        from gateway.http.upstream import UpstreamClients
        from gateway.metrics import Metrics
        from gateway.observe import AccessLog
        from gateway.workers.admin import worker_report
        from gateway.workers.http_entry import HttpEntry
        from gateway.workers.listeners import Listeners
        from gateway.workers.rollouts import ANSWERED_OPS, Rollouts
        from gateway.workers.routing import Routing
        from gateway.workers.tunnel_endpoint import TunnelEndpoint

        cfg = self.config
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

        self.ids = RequestIds(gateway_prefix(self.instance, self.index))
        self.routing = Routing(cfg, worker=self.index, workers=self.workers, spawn=self.spawn)
        self.upstreams = UpstreamClients()
        self.metrics = Metrics(cluster=bool(cfg.cluster))
        self.metrics.set_config_versions(self.routing.config_versions())
        self.access_log = AccessLog(cfg.access_log)
        self.http_entry = HttpEntry(self.routing, self.ids, access_log=self.access_log, metrics=self.metrics)
        self.endpoint = TunnelEndpoint(self.routing, self.upstreams, self.metrics, instance=self.instance)
        self.endpoint.start()
        self.spawn(self._sample_metrics())
        if self.heartbeat is not None:
            self.spawn(self._beat())
        if self.router_endpoint:
            # zmq is loaded only by workers that have a router to talk to.
            from gateway.workers.router_link import RouterLink

            self.link = RouterLink(self.routing, self.router_endpoint, report=lambda: worker_report(self),
                                   on_command=self.routing.run_command)
            self.routing.attach(self.link)
            await self.link.start()
        self.rollouts = Rollouts(self)
        self.rollouts.start()
        if self.link is not None:
            for op in ANSWERED_OPS:
                self.link.answers[op] = self.rollouts.answer

        listeners = Listeners(self)
        await listeners.start()
        urls = listen_urls(cfg)
        log.info("listening: %s", ", ".join(f"{what} {url}" for what, url in urls.items()),
                 extra={"http_port": cfg.http_port, "tunnel_port": cfg.tunnel_port, "admin_port": cfg.admin_port,
                        "urls": urls})
        settle_heap()
        await stop.wait()
        await self.shutdown(listeners)

    async def shutdown(self, listeners: Any) -> None:
        """In order: stop accepting, drain streams, then end the rest."""
        self.stopping = True
        self.endpoint.stopping = True
        if self.link is not None:
            self.link.announce_soon()
        grace = self.config.shutdown_grace
        log.info("shutting down", extra={"grace": grace})
        # grpc says at warning that it aborts each call still open when its server stops; at a
        # shutdown that is the plan (each stream's own line says how it ended).
        logging.getLogger("grpc._cython.cygrpc").setLevel(logging.ERROR)
        stopping = await listeners.stop_accepting(grace)
        drains = [self.spawn(s.goaway("shutdown", grace)) for s in list(self.routing.registry)]
        deadline = time.monotonic() + grace
        if drains:
            await asyncio.wait(drains, timeout=grace + 2)
        # Requests this worker originated (local or through other workers) finish too.
        while self.http_entry.book.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.wait(stopping, timeout=grace + 2)
        await listeners.cleanup()
        if self.link is not None:
            await self.link.stop()
        for task in list(self._tasks):
            task.cancel()
        self.endpoint.close()
        await self.upstreams.close()
        self.access_log.close()
        log.info("stopped")


def listen_urls(cfg: GatewayConfig) -> dict[str, str]:
    """Where to reach each port, as a URL to paste (a wildcard host shown as loopback)."""
    def at(host: str, port: int) -> str:
        host = "127.0.0.1" if host in ("", "0.0.0.0", "*") else "[::1]" if host == "::" else host
        return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"

    urls = {"http": f"{'https' if cfg.http_tls else 'http'}://{at(cfg.host, cfg.http_port)}"}
    if cfg.grpc_port:
        urls["grpc"] = f"{'https' if cfg.http_tls else 'http'}://{at(cfg.host, cfg.grpc_port)}"
    urls["tunnel"] = at(cfg.host, cfg.tunnel_port)  # what a client's server setting takes
    if cfg.admin_port:
        urls["admin"] = f"http://{at(cfg.admin_host, cfg.admin_port)}/"
    return urls


def read_handoff(path: str) -> GatewayConfig:
    """The config the supervisor left at `path`: only a file of this user's,
    readable by no one else, is unpickled (unpickling runs code)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PermissionError(f"{path} is not this user's private file")
        new = pickle.load(fh)
    if not isinstance(new, GatewayConfig):
        raise TypeError(f"{path} holds no gateway config")
    return new


def worker_main(
    config: GatewayConfig, index: int, instance: str, router_endpoint: str | None,
    config_handoff: str | None, workers: int = 1, heartbeat: Any = None,
) -> None:
    """Entry point of a worker process (spawned by the supervisor)."""
    Worker(config, index, instance, router_endpoint, config_handoff, workers, heartbeat).run()
