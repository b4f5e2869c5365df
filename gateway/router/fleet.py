"""The fleet registry (gateway/cluster/registry.py) run by the router process:
in a thread with an asyncio loop of its own, so the broker's loop, synchronous
on ZeroMQ, never waits on Redis.

The broker reads `nodes` and `up` (attributes replaced whole, never changed in
place: safe to read from its thread), and is woken through a pipe it polls
beside its sockets whenever the copy changes. What it publishes (this node's
streams) reaches the registry by `call_soon_threadsafe`."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, Callable

from gateway.cluster.config import ClusterSettings
from gateway.cluster.record import NodeRecord, WorkerLoad
from gateway.cluster.registry import Registry
from gateway.cluster.rollout_store import RolloutStore

__all__ = ["FleetThread"]

log = logging.getLogger("gateway.router")

# The thread's start (the registry's start returns without waiting for Redis).
START_TIMEOUT = 5.0


class FleetThread:
    def __init__(self, settings: ClusterSettings, own: NodeRecord) -> None:
        self.settings = settings
        self.own = own
        self.nodes: dict[str, NodeRecord] = {own.node_id: own}
        self._registry: Registry | None = None
        self._store: RolloutStore | None = None
        # The fleet's rollout book as Redis last had it (b"": none), None before the first read.
        self.rollouts: bytes | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name=f"fleet-{own.node_id}", daemon=True)

    @property
    def wake_fd(self) -> int:
        """Readable when the fleet changed (poll it; then `drain_wakeups`)."""
        return self._wake_r

    @property
    def up(self) -> bool:
        registry = self._registry
        return registry is not None and registry.up

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            log.error("the fleet registry thread did not start", extra={"node_id": self.own.node_id})

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:  # a bug: the router goes on serving this node's workers
            log.exception("the fleet registry thread failed", extra={"node_id": self.own.node_id})
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        s = self.settings
        self._registry = Registry(s.url, self.own, prefix=s.prefix, node_ttl=s.node_ttl, on_change=self._changed)
        self._store = RolloutStore(s.url, s.prefix, self._book_changed)
        await self._registry.start()
        await self._store.start()
        self._ready.set()
        await self._stopping.wait()
        await self._store.stop()
        await self._registry.stop()

    def _changed(self, nodes: dict[str, NodeRecord]) -> None:
        # In the registry's loop: swap the copy whole, then wake the broker.
        self.nodes = nodes
        self._wake()

    def _book_changed(self, raw: bytes) -> None:
        self.rollouts = raw
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: one read is enough

    def put_rollouts(self, raw: bytes, revision: int) -> None:
        """The deciding worker's book, for every node (RolloutStore.put)."""
        store, loop = self._store, self._loop
        if store is not None and loop is not None:
            self._call(lambda: loop.create_task(store.put(raw, revision)))

    def drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def publish(self, groups: dict[str, int], workers: dict[str, WorkerLoad]) -> None:
        """This node's streams, for its record (see Registry.set_load)."""
        if self._registry is not None:
            self._call(self._registry.set_load, groups, workers)

    def set_state(self, state: str) -> None:
        """"serving" or "draining", written to the registry at once (Registry.set_state)."""
        if self._registry is not None:
            self._call(self._registry.set_state, state)

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has ended (stopping)
            pass

    def stop(self, timeout: float = 5.0) -> None:
        """Leave the fleet (the registry deletes this node's key, bounded) and end the thread."""
        if self._stopping is not None:
            self._call(self._stopping.set)
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the fleet registry thread did not stop in time", extra={"node_id": self.own.node_id})
            return  # its pipe stays open for it: the process is ending anyway
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
