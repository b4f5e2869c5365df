"""The tunnel client process once its config is loaded: the agent's tunnel
connections, the local egress entry and the admin port, until a stop signal."""
from __future__ import annotations

import asyncio
import os
import signal

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.client.agent import Agent
from gateway.client.config import ClientConfig
from gateway.client.inspector import add_client_inspector_routes, client_inspector
from gateway.client.local_entry import LocalEntry
from gateway.client.quick import Console
from gateway.grpc_io import grpc_io_in_use
from gateway.heap import settle_heap
from gateway.http.connections import EntryLimits
from gateway.http.entry import entry_server
from gateway.http.upstream import UpstreamClients
from gateway.metrics import CONTENT_TYPE_LATEST, Metrics, render
from gateway.observe import AccessLog

__all__ = ["serve"]


async def serve(config: ClientConfig, console: Console | None = None) -> int:
    """Run the agent (and the local entry and admin port when configured) until SIGTERM or
    SIGINT (exit status 0), or until it fails for good (1: a refused HELLO, a duplicate identity)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    upstreams = UpstreamClients()
    agent = Agent(config, upstreams)
    agent.console = console
    agent.inspector = client_inspector(config)  # None without a status port or with inspect = false
    agent.load_cache()
    runners = []
    local = None
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    access_log = AccessLog(config.access_log)
    if config.local_port:
        entry = LocalEntry(agent, access_log=access_log, metrics=metrics)
        dropped = metrics.dropped_connections
        local = entry_server(entry.handle, config.max_header_bytes, EntryLimits.of(config),
                             on_drop=lambda reason: dropped.labels("local", reason).inc())
        await local.listen(config.local_host, config.local_port)
    if config.admin_port:
        runners.append(await _start_admin(agent, config, registry))
    settle_heap()
    try:
        await agent.run_forever(stop)
    finally:
        if local is not None:
            await local.shutdown()
        for runner in runners:
            await runner.cleanup()
        await upstreams.close()
        access_log.close()
    return 1 if agent.fatal else 0


async def _start_admin(agent: Agent, config: ClientConfig, registry: CollectorRegistry) -> web.BaseRunner:
    def state() -> dict:
        streams = agent.streams()
        return {
            "client_id": config.client_id,
            "group": config.group,
            "pid": os.getpid(),
            "connected": agent.connected > 0,
            "connections": agent.connected,
            "wanted": len(agent.connections),
            "connects": sum(c.connects for c in agent.connections),
            # Streams let go (a move, a GOAWAY) that still finish what they carry.
            "draining": sum(len(c.draining) for c in agent.connections),
            "config_version": agent.config_version,
            "last_rejection": agent.last_rejection,
            "pending": sum(len(s.pending) for s in streams),
            "serving": sum(len(s.serving) for s in streams),
            "requests_served": sum(s.requests_served for s in streams),  # on the connections up now
            "unknown_frames": sum(s.unknown_frames for s in streams),
            # frames_out / batches_out: how many frames share a gRPC message; bytes_out / batches_out: its size
            "batches_out": sum(s.batches_out for s in streams),
            "frames_out": sum(s.frames_out for s in streams),
            "bytes_out": sum(s.bytes_out for s in streams),
            "grpc_io": grpc_io_in_use(),
            # Which gateway node and worker each connection is on (null: connecting), and the nodes known.
            "placement": [{"connection": c.index, "node": c.node, "worker": c.seat.worker if c.seat else None,
                           "moves": c.moves} for c in agent.connections],
            "nodes": agent.nodes.known(),
            "nodes_down": sorted(n for n in agent.nodes.known() if n not in agent.nodes.usable()),
        }

    async def healthz(_r: web.Request) -> web.Response:
        st = state()
        return web.Response(body=orjson.dumps(st), status=200 if st["connected"] else 503, content_type="application/json")

    async def status(_r: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(state()), content_type="application/json")

    async def metrics(_r: web.Request) -> web.Response:
        return web.Response(body=render(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    if agent.inspector is not None:
        add_client_inspector_routes(app, agent, agent.inspector)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.admin_host, config.admin_port).start()
    return runner
