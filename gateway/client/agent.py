"""The agent: keeps a tunnel to the gateway and serves what arrives on it."""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import grpc
import grpc.aio

from gateway import __version__
from gateway.client.config import ClientConfig
from gateway.groupconfig import group_config_from_json
from gateway.settings import ConfigError
from gateway.tunnel import frames
from gateway.tunnel.dispatch import RuleDispatcher
from gateway.tunnel.stream import InboundExchange, StreamLimits, TunnelStream
from gateway.tunnel.transport import ClientTransport, grpc_options, open_client_call

__all__ = ["Agent", "Backoff"]

log = logging.getLogger("gateway.client")

# A connection that stayed up this long resets the back-off.
HEALTHY_AFTER = 10.0


class Backoff:
    """Exponential back-off with full jitter, capped."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * (2 ** self.attempt))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)


class Agent:
    def __init__(self, config: ClientConfig, session: Any) -> None:
        self.config = config
        self.session = session
        self.stream: TunnelStream | None = None
        self.dispatcher: RuleDispatcher | None = None
        self.config_version = ""
        self.connected_since: float | None = None
        self.last_rejection: str = ""
        self.connects = 0
        self._draining: set[asyncio.Task] = set()
        self._goaway = asyncio.Event()

    async def handle(self, ex: InboundExchange) -> None:
        # The dispatcher is read once: a config swap does not touch running requests.
        dispatcher = self.dispatcher
        if dispatcher is None:
            ex.reset("upstream_unavailable", "client has no config yet")
            return
        await dispatcher.handle(ex)

    def _apply_config(self, version: str, raw: bytes) -> None:
        group = group_config_from_json(raw, f"gateway config {version}")
        self.dispatcher = RuleDispatcher(group.rules, group.upstreams, self.session)
        self.config_version = version
        log.info("config applied", extra={"config_version": version, "rules": len(group.rules)})

    def _on_control(self, f: frames.Frame, kind: str) -> None:
        if kind == "config":
            try:
                self._apply_config(f.config.config_version, f.config.config_json)
            except ConfigError as exc:
                log.error("config from gateway rejected: %s", exc)
        elif kind == "goaway":
            self._goaway.set()

    async def run_forever(self, stop: asyncio.Event) -> None:
        backoff = Backoff(self.config.reconnect_initial, self.config.reconnect_max)
        while not stop.is_set():
            started = time.monotonic()
            outcome = await self._connect_once(stop)
            if stop.is_set():
                break
            if outcome == "goaway":
                backoff.reset()
                continue
            if outcome == "served" and time.monotonic() - started > HEALTHY_AFTER:
                backoff.reset()
            delay = backoff.next_delay()
            log.info("reconnecting", extra={"in_seconds": round(delay, 2), "after": outcome})
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
        for task in list(self._draining):
            task.cancel()

    async def _connect_once(self, stop: asyncio.Event) -> str:
        cfg = self.config
        channel = grpc.aio.insecure_channel(cfg.server, options=grpc_options(16 << 20, 10000, server=False))
        call = open_client_call(channel)
        transport = ClientTransport(call, cfg.server)
        run_task: asyncio.Task | None = None
        try:
            hello = frames.hello(
                client_id=cfg.client_id, group=cfg.group, token=cfg.token, version=__version__,
                capabilities=["http"], connection_index=0,
            )
            await transport.write(frames.encode_frame(hello))
            raw = await asyncio.wait_for(transport.read(), cfg.connect_timeout)
            if raw is None:
                log.warning("gateway closed the tunnel before WELCOME")
                return "closed"
            first = frames.decode_batch(raw)
            if not first or first[0].WhichOneof("kind") != "welcome":
                log.error("gateway did not answer with WELCOME")
                return "protocol_error"
            welcome = first[0].welcome
            if not welcome.accepted:
                self.last_rejection = welcome.code
                log.error("gateway rejected this client: %s: %s", welcome.code, welcome.message,
                          extra={"code": welcome.code, "group": cfg.group})
                return "rejected"
            self._apply_config(welcome.config_version, welcome.config_json)
            limits = StreamLimits(
                max_inflight=cfg.max_inflight,
                window=welcome.window or 262144,
                chunk_size=welcome.chunk_size or 65536,
                heartbeat_interval=(welcome.heartbeat_ms or 5000) / 1000,
            )
            stream = TunnelStream(
                transport, limits=limits, on_request=self.handle, peer_id="gateway", group=cfg.group,
                label=f"{cfg.client_id}/0", on_control=self._on_control,
            )
            self._goaway.clear()
            self.stream = stream
            self.connects += 1
            self.connected_since = time.time()
            self.last_rejection = ""
            log.info("tunnel connected", extra={"server": cfg.server, "worker": welcome.worker,
                                                 "config_version": welcome.config_version})
            run_task = asyncio.get_running_loop().create_task(stream.run())
            goaway = asyncio.get_running_loop().create_task(self._goaway.wait())
            stopping = asyncio.get_running_loop().create_task(stop.wait())
            await asyncio.wait([run_task, goaway, stopping], return_when=asyncio.FIRST_COMPLETED)
            goaway.cancel()
            stopping.cancel()
            if not run_task.done() and self._goaway.is_set():
                # Finish in-flight requests on the old stream while a new one opens.
                self._draining.add(run_task)
                run_task.add_done_callback(lambda t: self._finish_drain(t, channel))
                run_task = None
                channel = None
                return "goaway"
            if not run_task.done():
                stream.close("client_stopping")
                await run_task
            log.warning("tunnel lost", extra={"reason": stream.close_reason})
            return "served"
        except (grpc.aio.AioRpcError, asyncio.TimeoutError, frames.ProtocolError, ConfigError, OSError) as exc:
            log.warning("cannot reach gateway: %s", _describe(exc), extra={"server": cfg.server})
            return "unreachable"
        finally:
            # Returning means this stream takes no new requests.
            self.stream = None
            self.connected_since = None
            if run_task is not None and not run_task.done():
                run_task.cancel()
            if channel is not None:
                await channel.close()

    def _finish_drain(self, task: asyncio.Task, channel: grpc.aio.Channel) -> None:
        self._draining.discard(task)
        asyncio.get_running_loop().create_task(channel.close())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
