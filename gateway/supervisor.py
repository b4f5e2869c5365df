"""The supervisor: spawns the router and the workers, watches, respawns and
signals them. It never imports grpc or zmq (children are started with the
spawn context and import what they need themselves).

Signal handlers only queue the signal; the main loop dispatches
`handle_<signal>`. SIGTERM/SIGINT drain and stop (a node of a fleet first has
its router mark it draining in the registry, DRAIN_NOTICE before its workers
stop accepting, so the others stop choosing its streams first; a second signal
forces and makes the exit status 1). SIGHUP reloads the config into every
worker: the supervisor parses and validates the file once and hands the result
to the workers (a file only it writes, then SIGHUP): all get the same config.

Liveness: each worker's event loop stamps a shared clock (a `RawValue` the
supervisor hands it, as gunicorn's heartbeat file) every second; a worker
whose stamp is older than `worker_timeout` (hung, stopped, its loop blocked)
is killed and respawned. What the supervisor makes on disk (the router's ipc
socket, the config handoff, the metrics folder) is in folders it removes on
exit.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from setproctitle import setproctitle

from gateway.cluster.config import ClusterSettings, cluster_settings
from gateway.config import GatewayConfig, RestartRequired, load_gateway_config, restart_only_change
from gateway.exposure import is_loopback
from gateway.ids import new_instance_id
from gateway.logs import setup_logging
from gateway.router.envelope import ipc_endpoint
from gateway.settings import ConfigError

__all__ = ["Supervisor", "EXIT_OK", "EXIT_FORCED", "EXIT_BOOT_ERROR"]

log = logging.getLogger("gateway.supervisor")

EXIT_OK = 0
EXIT_FORCED = 1  # a stop that cut work in flight (second signal, or the grace ran out)
EXIT_BOOT_ERROR = 3
# A worker not yet beating is booting (imports, binds): it gets at least this long.
BOOT_TIMEOUT = 60.0
# A child that lived at least this long was healthy: its next crash respawns at once.
HEALTHY_AFTER = 10.0
MAX_BACKOFF = 30.0
SETTLE = 0.3  # seconds a changed config file must stand still before it is read
DRAIN_NOTICE = 1.0  # seconds the fleet has to read that a stopping node drains (a registry round trip)


def _run_worker(config: GatewayConfig, index: int, instance: str, endpoint: str | None,
                config_handoff: str, workers: int, heartbeat: Any) -> None:
    # Imported in the child: the worker module leads to grpc, zmq and aiohttp.
    from gateway.workers.worker import worker_main

    worker_main(config, index, instance, endpoint, config_handoff, workers, heartbeat)


def _run_router(endpoint: str, log_level: str, log_format: str, cluster: ClusterSettings | None = None,
                listener: socket.socket | None = None) -> None:
    # Imported in the child: the broker loads zmq.
    from gateway.router.broker import router_main

    router_main(endpoint, log_level, log_format, cluster, listener)


def _forget_metrics_of(pid: int) -> None:
    """A dead worker's live gauges stop counting; its counters stay."""
    # prometheus_client costs ~30 ms to import; only a respawn needs it here.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


@dataclass
class Child:
    name: str
    make: Callable[[], multiprocessing.process.BaseProcess]
    process: Any = None
    started: float = 0.0
    failures: int = 0
    respawn_at: float | None = None
    ever_healthy: bool = False
    # The worker's loop writes time.monotonic() here every second; 0 until it serves.
    heartbeat: Any = None

    def start(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.value = 0.0
        self.process = self.make()
        self.process.start()
        self.started = time.monotonic()
        self.respawn_at = None
        log.info("started %s", self.name, extra={"pid": self.process.pid})

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


class Supervisor:
    def __init__(self, config: GatewayConfig, workers: int, overrides: argparse.Namespace | None = None,
                 peer_listener: socket.socket | None = None) -> None:
        self.config = config
        # With cluster: the claimed peer port, listening; each router (a respawned one too) gets it.
        self.peer_listener = peer_listener
        self.n_workers = workers
        self.overrides = overrides
        self.instance = new_instance_id()
        self.ctx = multiprocessing.get_context("spawn")
        self.children: list[Child] = []
        self.signals: list[int] = []
        self.stopping = False
        self._drain_at: float | None = None  # when the workers are told to drain
        self.exit_code = EXIT_OK
        self._wake_r, self._wake_w = os.pipe()
        self._own_metrics_dir: str | None = None
        self._stamp = self._config_stamp()
        self._settling: tuple[tuple[float, int], float] | None = None  # a new stamp, and since when
        # A reloaded config, parsed here once, waits in this file for the workers (SIGHUP tells them).
        # Its folder is private (0700): the file holds the tokens, and workers unpickle it.
        self._handoff_dir = tempfile.mkdtemp(prefix=f"tunnel-gateway-{self.instance}-")
        self.config_handoff = os.path.join(self._handoff_dir, "config.pickle")
        # The router's socket lives in the same private folder: only this user reaches it, and it
        # goes with the folder however the gateway ends (a SIGKILLed router leaves no file behind).
        # One worker needs no router, unless the gateway is a node of a fleet: the router links the nodes.
        self.endpoint = ipc_endpoint(self.instance, self._handoff_dir) if workers > 1 or config.cluster else None

    # -- children --------------------------------------------------------------

    def _worker_child(self, index: int) -> Child:
        heartbeat = self.ctx.RawValue("d", 0.0)

        def make() -> multiprocessing.process.BaseProcess:
            # Read self.config at spawn time: a respawned worker gets the reloaded config.
            return self.ctx.Process(
                target=_run_worker, name=f"worker-{index}",
                args=(self.config, index, self.instance, self.endpoint, self.config_handoff, self.n_workers,
                      heartbeat),
            )

        return Child(f"worker {index}", make, heartbeat=heartbeat)

    def _router_child(self) -> Child:
        def make() -> multiprocessing.process.BaseProcess:
            return self.ctx.Process(
                target=_run_router, name="router",
                args=(self.endpoint, self.config.log_level, self.config.log_format,
                      cluster_settings(self.config.settings), self.peer_listener),
            )

        return Child("router", make)

    # -- signals ---------------------------------------------------------------

    def _queue_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def handle_term(self) -> None:
        if self.stopping:
            cut = [c for c in self.children if c.name != "router" and c.alive]
            log.warning("second stop signal: forcing exit", extra={"workers_cut": len(cut)})
            if cut and self.exit_code == EXIT_OK:
                self.exit_code = EXIT_FORCED
            for child in self.children:
                if child.alive:
                    child.process.kill()
            return
        self.stopping = True
        router = next((c for c in self.children if c.name == "router" and c.alive and self.config.cluster), None)
        if router is not None:
            os.kill(router.process.pid, signal.SIGUSR1)
        self._drain_at = time.monotonic() + (DRAIN_NOTICE if router is not None else 0)

    def _signal_workers(self, sig: int, router: bool = False) -> None:
        for child in self.children:
            if child.alive and (router or child.name != "router"):
                os.kill(child.process.pid, sig)

    handle_int = handle_term

    def handle_hup(self) -> None:
        try:
            new = load_gateway_config(self.config.path, self.overrides)
            if (restart := restart_only_change(self.config, new)) is not None:
                raise restart
        except ConfigError as exc:  # every error, one line; a restart asked for is the operator's call: a warning
            log.log(logging.WARNING if isinstance(exc, RestartRequired) else logging.ERROR, "config reload rejected: %s",
                    "; ".join(e.line for e in exc.errors), extra={"file": exc.file, "keys": [e.key for e in exc.errors]})
            return
        try:
            self._hand_off(new)
        except OSError as exc:
            log.error("config reload failed: cannot write %s: %s", self.config_handoff, exc)
            return
        self.config = new
        log.info("config reloaded; telling the workers", extra={"file": new.path})
        self._signal_workers(signal.SIGHUP)

    def remove_handoff(self) -> None:
        shutil.rmtree(self._handoff_dir, ignore_errors=True)

    def _hand_off(self, config: GatewayConfig) -> None:
        """Leave `config` where the workers read it on SIGHUP: written whole,
        then renamed, readable by this user only (it holds the tokens)."""
        fd, tmp = tempfile.mkstemp(dir=self._handoff_dir, prefix=".handoff-")
        try:
            with os.fdopen(fd, "wb") as fh:
                pickle.dump(config, fh, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, self.config_handoff)
        except BaseException:
            os.unlink(tmp)
            raise

    # -- main loop -------------------------------------------------------------

    def _metrics_dir(self) -> None:
        """Every worker writes its metrics here; a scrape of any worker adds them up.
        Set before any child starts, wiped at start as prometheus-client asks."""
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not path:
            path = os.path.join(tempfile.gettempdir(), f"tunnel-gateway-{self.instance}-metrics")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
            self._own_metrics_dir = path
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.unlink(os.path.join(path, name))

    def run(self) -> int:
        """Supervise until stopped; returns the exit code. What the supervisor
        made on disk (metrics folder, config handoff) is removed however it ends."""
        try:
            return self._supervise()
        finally:
            os.close(self._wake_r)
            os.close(self._wake_w)
            if self._own_metrics_dir:
                shutil.rmtree(self._own_metrics_dir, ignore_errors=True)
            self.remove_handoff()

    def _supervise(self) -> int:
        setproctitle("tunnel-gateway: supervisor")
        setup_logging(self.config.log_level, self.config.log_format, prefix={"process": "supervisor"})
        if self.config.tunnel_port and not is_loopback(self.config.host) and not self.config.tls_cert:
            log.warning("the tunnel port listens on %s without TLS: client tokens cross the network in plain "
                        "text (set tls_cert and tls_key)", self.config.host,
                        extra={"tunnel_port": self.config.tunnel_port})
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._queue_signal)
        self._metrics_dir()
        if self.endpoint:
            self.children.append(self._router_child())
        self.children += [self._worker_child(i) for i in range(self.n_workers)]
        for child in self.children:
            child.start()
        log.info("supervisor running", extra={"workers": self.n_workers, "instance": self.instance})
        deadline: float | None = None
        while True:
            sentinels = [c.process.sentinel for c in self.children if c.alive]
            wait = 0.5 if self._drain_at is None else max(0.0, min(0.5, self._drain_at - time.monotonic()))
            multiprocessing.connection.wait(sentinels + [self._wake_r], timeout=wait)
            self._drain_wakeups()
            while self.signals:
                sig = self.signals.pop(0)
                name = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGHUP: "hup"}[sig]
                getattr(self, f"handle_{name}")()
            if not self.stopping:
                self._reap_and_respawn()
                self._murder_silent_workers()
                self._watch_config()
            if self._drain_at is not None and time.monotonic() >= self._drain_at:
                self._drain_at = None
                log.info("stopping: draining workers", extra={"grace": self.config.shutdown_grace})
                self._signal_workers(signal.SIGTERM)
            if self.stopping:
                # Set however the stop began: a signal, or a worker that could not boot.
                if deadline is None:
                    deadline = time.monotonic() + self.config.shutdown_grace + 5
                if self._stop_step(deadline):
                    break
        log.info("supervisor exiting", extra={"code": self.exit_code})
        return self.exit_code

    def _config_stamp(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.config.path)
            return st.st_mtime_ns, st.st_size
        except OSError:
            return None

    def _watch_config(self) -> None:
        """A changed file is reloaded as on SIGHUP (a bad one is rejected and logged)."""
        if not self.config.watch_config:
            return
        stamp = self._config_stamp()
        if stamp is None or stamp == self._stamp:
            self._settling = None
            return
        # Read it once it has stood still for SETTLE seconds: an editor or a script
        # writing it in place must not have a half-written file parsed (and rejected,
        # or worse, accepted with its end missing).
        now = time.monotonic()
        if self._settling is None or self._settling[0] != stamp:
            self._settling = (stamp, now)
            return
        if now - self._settling[1] < SETTLE:
            return
        self._stamp, self._settling = stamp, None
        log.info("config file changed on disk", extra={"file": self.config.path})
        self.handle_hup()

    def _drain_wakeups(self) -> None:
        os.set_blocking(self._wake_r, False)
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _reap_and_respawn(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.process is not None and not child.process.is_alive() and child.respawn_at is None:
                code = child.process.exitcode
                lived = now - child.started
                child.process.join(0)
                if code == EXIT_BOOT_ERROR and lived < HEALTHY_AFTER:
                    log.error("%s could not boot (exit %s); stopping the gateway", child.name, code)
                    self.exit_code = EXIT_BOOT_ERROR
                    self.stopping = True
                    self._signal_workers(signal.SIGTERM, router=True)
                    return
                if child.name != "router":
                    _forget_metrics_of(child.process.pid)
                child.failures = child.failures + 1 if lived < HEALTHY_AFTER else 1
                delay = 0.0 if child.failures <= 1 else min(MAX_BACKOFF, 0.5 * 2 ** (child.failures - 2))
                child.respawn_at = now + delay
                log.warning("%s died (exit %s); respawning in %.1fs", child.name, code, delay,
                            extra={"failures": child.failures})
            if child.respawn_at is not None and now >= child.respawn_at:
                child.start()

    def _murder_silent_workers(self) -> None:
        """Kill a worker whose loop has not stamped its heartbeat for worker_timeout
        (SIGKILL: a stopped or blocked process handles nothing gentler); the reaper
        respawns it."""
        if self.stopping:
            return  # the stop's own deadline bounds it now
        now = time.monotonic()
        timeout = self.config.worker_timeout
        for child in self.children:
            if child.heartbeat is None or not child.alive:
                continue
            beat = child.heartbeat.value
            silent = now - (beat or child.started)
            if silent > (timeout if beat else max(timeout, BOOT_TIMEOUT)):
                log.error("%s silent for %.1fs (worker_timeout %.1fs); killing it", child.name, silent, timeout,
                          extra={"pid": child.process.pid})
                child.process.kill()
                child.process.join(1)

    def _stop_step(self, deadline: float) -> bool:
        """One step of the shutdown; True when every child is gone."""
        workers_alive = [c for c in self.children if c.name != "router" and c.alive]
        if workers_alive and time.monotonic() > deadline:
            for c in workers_alive:
                log.warning("%s did not stop in time; killing it", c.name)
                c.process.kill()
            if self.exit_code == EXIT_OK:
                self.exit_code = EXIT_FORCED
        if workers_alive:
            return False
        for c in self.children:
            if c.name == "router" and c.alive:
                c.process.terminate()
                c.process.join(3)
                if c.alive:
                    c.process.kill()
        for c in self.children:
            if c.process is not None:
                c.process.join(1)
        return True
