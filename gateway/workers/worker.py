"""A gateway worker: one uvloop event loop serving the HTTP entry, the tunnel
endpoint and the admin port, on ports shared with other workers (SO_REUSEPORT).

`Worker.__init__` does nothing to the process; `init_process` sets it up.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Coroutine

from gateway.config import GatewayConfig
from gateway.ids import RequestIds, gateway_prefix, new_instance_id
from gateway.logs import setup_logging

__all__ = ["Worker"]

log = logging.getLogger("gateway.worker")


class Worker:
    def __init__(self, config: GatewayConfig, index: int = 0, instance: str | None = None) -> None:
        self.config = config
        self.index = index
        self.instance = instance or new_instance_id()
        self.stopping = False
        self.started = time.monotonic()
        self._tasks: set[asyncio.Task] = set()

    def init_process(self) -> None:
        from setproctitle import setproctitle

        setproctitle(f"tunnel-gateway: worker {self.index}")
        setup_logging(self.config.log_level, self.config.log_format, prefix={"worker": self.index})

    def run(self) -> None:
        import uvloop

        self.init_process()
        uvloop.run(self.serve())

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """Start a background task this worker owns (cancelled on shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def serve(self) -> None:
        # grpc is imported here, in the worker, never in a parent process.
        import grpc.aio
        from aiohttp import web

        from gateway.tunnel.dispatch import RuleDispatcher
        from gateway.tunnel.proxy import upstream_session
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

        self.ids = RequestIds(gateway_prefix(self.instance, self.index))
        self.registry = StreamRegistry()
        self.session = upstream_session()
        self.egress = RuleDispatcher(cfg.forward, cfg.upstreams, self.session)
        self.http_entry = HttpEntry(self)
        self.endpoint = TunnelEndpoint(self)

        max_message = cfg.max_batch_bytes * 2 + cfg.max_header_bytes + cfg.chunk_size + (1 << 20)
        server = grpc.aio.server(
            options=grpc_options(max_message, int(cfg.heartbeat_interval * 1000), server=True),
            maximum_concurrent_rpcs=None,
        )
        server.add_generic_rpc_handlers([tunnel_handler(self.endpoint.serve)])
        server.add_insecure_port(f"{cfg.host}:{cfg.tunnel_port}")
        await server.start()

        app = web.Application(client_max_size=cfg.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self.http_entry.handle)
        # aiohttp's own limits sit above ours so oversize heads reach the
        # handler and get our 431 with a JSON body.
        parser_limit = max(8190, cfg.max_header_bytes * 2)
        runner = web.AppRunner(
            app, handle_signals=False, handler_cancellation=True, access_log=None,
            max_line_size=parser_limit, max_field_size=parser_limit,
        )
        await runner.setup()
        site = web.TCPSite(runner, cfg.host, cfg.http_port, reuse_port=True, backlog=1024)
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
        log.info("shutting down", extra={"grace": cfg.shutdown_grace})
        await site.stop()
        drains = [self.spawn(s.goaway("shutdown", cfg.shutdown_grace)) for s in list(self.registry)]
        if drains:
            await asyncio.wait(drains, timeout=cfg.shutdown_grace + 2)
        await server.stop(1.0)
        await runner.cleanup()
        await admin_runner.cleanup()
        for task in list(self._tasks):
            task.cancel()
        await self.session.close()
        log.info("stopped")
