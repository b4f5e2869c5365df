"""`tunnel-client`: connect to the gateway, serve the group, run the local entry."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import orjson

from gateway import __version__
from gateway.client.config import CLIENT_SETTINGS, ENV_PREFIX, ClientConfig, load_client_config
from gateway.grpc_io import choose_grpc_io, grpc_io_in_use
from gateway.logs import setup_logging
from gateway.settings import ConfigError, add_arguments

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunnel-client",
        description="Tunnel client: connects out to a tunnel-gateway, serves its group, runs the local egress entry.",
        epilog="Precedence: flag > environment (TUNNEL_CLIENT_*) > file > default. Exit codes: 0 ok, 2 bad config.",
    )
    p.add_argument("--config", "-c", default=None, help="TOML config file with a [client] table")
    p.add_argument("--version", action="version", version=f"tunnel-client {__version__}")
    add_arguments(p, CLIENT_SETTINGS, ENV_PREFIX)
    return p


async def serve(config: ClientConfig) -> None:
    from aiohttp import web

    from gateway.client.agent import Agent
    from gateway.client.local_entry import LocalEntry
    from gateway.tunnel.entry import entry_runner
    from gateway.tunnel.proxy import UpstreamClients

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    upstreams = UpstreamClients()
    agent = Agent(config, upstreams)
    agent.load_cache()
    runners = []
    from prometheus_client import CollectorRegistry

    from gateway.metrics import Metrics
    from gateway.observe import AccessLog

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    access_log = AccessLog(config.access_log)
    if config.local_port:
        entry = LocalEntry(agent, access_log=access_log, metrics=metrics)
        runner = entry_runner(entry.handle, config.max_header_bytes)
        await runner.setup()
        await web.TCPSite(runner, config.local_host, config.local_port).start()
        runners.append(runner)
    if config.admin_port:
        runners.append(await _start_admin(agent, config, registry))
    try:
        await agent.run_forever(stop)
    finally:
        for runner in runners:
            await runner.cleanup()
        await upstreams.close()
        access_log.close()


async def _start_admin(agent, config: ClientConfig, registry):
    from aiohttp import web

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
            "config_version": agent.config_version,
            "last_rejection": agent.last_rejection,
            "pending": sum(len(s.pending) for s in streams),
            "serving": sum(len(s.serving) for s in streams),
            "unknown_frames": sum(s.unknown_frames for s in streams),
            # frames_out / batches_out: how many frames share a gRPC message; bytes_out / batches_out: its size
            "batches_out": sum(s.batches_out for s in streams),
            "frames_out": sum(s.frames_out for s in streams),
            "bytes_out": sum(s.bytes_out for s in streams),
            "grpc_io": grpc_io_in_use(),
        }

    async def healthz(_r: web.Request) -> web.Response:
        st = state()
        return web.Response(body=orjson.dumps(st), status=200 if st["connected"] else 503, content_type="application/json")

    async def status(_r: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(state()), content_type="application/json")

    async def metrics(_r: web.Request) -> web.Response:
        from gateway.metrics import CONTENT_TYPE_LATEST, render

        return web.Response(body=render(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.admin_host, config.admin_port).start()
    return runner


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_client_config(args.config, args)
    except ConfigError as exc:
        print(f"tunnel-client: bad config: {exc}", file=sys.stderr)
        return 2
    import uvloop
    from setproctitle import setproctitle

    setproctitle(f"tunnel-client: {config.client_id}")
    setup_logging(config.log_level, config.log_format, prefix={"client_id": config.client_id})
    choose_grpc_io(config.grpc_event_engine)
    uvloop.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
