"""The agent: keeps N tunnel connections to the gateway and serves what
arrives on them. Each connection is its own stream with its own back-off;
losing one does not interrupt the others."""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time

import orjson

import grpc
import grpc.aio

from gateway import __version__
from gateway.balance import prefer_filling
from gateway.client.config import ClientConfig
from gateway.groupconfig import group_config_from_json
from gateway.settings import ConfigError
from gateway.tls import channel_credentials
from gateway.tunnel import frames
from gateway.dispatch import RuleDispatcher
from gateway.http.upstream import UpstreamClients
from gateway.tunnel.exchange import InboundExchange
from gateway.tunnel.stream import StreamLimits, TunnelStream
from gateway.tunnel.transport import (CLIENT_KEEPALIVE_MS, CLIENT_MAX_MESSAGE, ClientTransport, grpc_options,
                                      open_client_call)

__all__ = ["Agent", "Connection", "Backoff", "FATAL_REFUSALS"]

log = logging.getLogger("gateway.client")

# A connection that stayed up this long resets the back-off.
HEALTHY_AFTER = 10.0
REJECTED_MIN_DELAY = 15.0
# Refusals no retry can mend: the client stops (exit status 1). `draining` is not
# one (another worker or server takes the client); bad_token and unknown_group
# are what gateways before bad_credentials said.
FATAL_REFUSALS = frozenset({"bad_credentials", "missing_token", "token_expired", "bad_certificate",
                            "bad_token", "unknown_group"})


class Backoff:
    """Exponential back-off with jitter (half to full of the step), capped."""

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


class Connection:
    """One tunnel connection: connect, serve until lost, back off, again."""

    def __init__(self, agent: "Agent", index: int) -> None:
        self.agent = agent
        self.index = index
        self.stream: TunnelStream | None = None
        self.draining: set[TunnelStream] = set()
        self.connected_since: float | None = None
        self.connects = 0
        self._goaway = asyncio.Event()
        self.goaway_reason = ""
        self._drain_tasks: set[asyncio.Task] = set()

    def _on_control(self, f: frames.Frame, kind: str) -> None:
        if kind == "config":
            error = self.agent.apply_config(f.config.config_version, f.config.config_json)
            if self.stream is not None:
                # Acknowledge: the version applied, or why not.
                self.stream.push(frames.config(f.config.config_version, b"", error))
        elif kind == "goaway":
            self.goaway_reason = f.goaway.reason
            self._goaway.set()

    async def run_forever(self, stop: asyncio.Event) -> None:
        cfg = self.agent.config
        backoff = Backoff(cfg.reconnect_initial, cfg.reconnect_max)
        try:
            while not stop.is_set():
                started = time.monotonic()
                outcome = await self._connect_once(stop)
                if stop.is_set():
                    break
                if outcome == "goaway" and self.goaway_reason == "replaced_by_newer_connection":
                    # Another process runs with our identity and took this connection over;
                    # taking it back would only make the two fight. A deployment error: stop.
                    self.agent.fail(f"another tunnel-client with this identity (group {cfg.group!r}, client_id "
                                    f"{cfg.client_id!r}) took over connection {self.index}: two processes share "
                                    f"one client id; this one stops")
                    return
                if outcome == "goaway":
                    backoff.reset()
                    continue
                if outcome == "served" and time.monotonic() - started > HEALTHY_AFTER:
                    backoff.reset()
                delay = backoff.next_delay()
                if outcome == "rejected" and self.agent.last_rejection != "draining":
                    # Retrying a refusal fast helps nobody: a few attempts a minute at most.
                    delay = max(delay, REJECTED_MIN_DELAY)
                log.info("reconnecting", extra={"in_seconds": round(delay, 2), "after": outcome,
                                                "connection": self.index})
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            for task in list(self._drain_tasks):
                task.cancel()

    async def _handshake(self, transport: ClientTransport) -> frames.pb.Welcome | None:
        cfg = self.agent.config
        hello = frames.hello(
            client_id=cfg.client_id, group=cfg.group, token=cfg.token, version=__version__,
            capabilities=["http", frames.HEADER_FIELDS], connection_index=self.index,
        )
        await transport.write(frames.encode_frame(hello))
        raw = await asyncio.wait_for(transport.read(), cfg.connect_timeout)
        if raw is None:
            raise frames.ProtocolError("gateway closed the tunnel before WELCOME")
        first = frames.decode_batch(raw)
        if not first or first[0].WhichOneof("kind") != "welcome":
            raise frames.ProtocolError("gateway did not answer with WELCOME")
        welcome = first[0].welcome
        if not welcome.accepted:
            self.agent.last_rejection = welcome.code
            # The token is never logged.
            level = logging.WARNING if welcome.code == "draining" else logging.ERROR
            log.log(level, "gateway rejected this client: %s: %s", welcome.code, welcome.message,
                    extra={"code": welcome.code, "group": cfg.group, "connection": self.index})
            if welcome.code in FATAL_REFUSALS:
                self.agent.fail(f"the gateway refused this client ({welcome.code}: {welcome.message}): "
                                f"check its group, token and certificate; it stops")
            return None
        return welcome

    async def _channel(self) -> grpc.aio.Channel:
        cfg = self.agent.config
        options = grpc_options(CLIENT_MAX_MESSAGE, CLIENT_KEEPALIVE_MS, server=False)
        if not (cfg.tls or cfg.tls_ca or cfg.insecure):
            return grpc.aio.insecure_channel(cfg.server, options=options)
        # --insecure fetches the gateway's certificate: blocking I/O, off the loop.
        creds, name = await asyncio.get_running_loop().run_in_executor(
            None, lambda: channel_credentials(cfg.server, ca=cfg.tls_ca, cert=cfg.tls_cert, key=cfg.tls_key,
                                              insecure=cfg.insecure))
        if name:
            options = options + [("grpc.ssl_target_name_override", name)]
        return grpc.aio.secure_channel(cfg.server, creds, options=options)

    async def _connect_once(self, stop: asyncio.Event) -> str:
        cfg = self.agent.config
        loop = asyncio.get_running_loop()
        try:
            channel = await self._channel()
        except (OSError, ValueError) as exc:
            log.warning("cannot set up the tunnel channel: %s", _describe(exc), extra={"server": cfg.server})
            return "unreachable"
        transport = ClientTransport(open_client_call(channel), cfg.server)
        keep_channel = False
        try:
            welcome = await self._handshake(transport)
            if welcome is None:
                return "rejected"
            self.agent.apply_config(welcome.config_version, welcome.config_json)
            limits = StreamLimits(
                max_inflight=cfg.max_inflight,
                window=welcome.window or 262144,
                chunk_size=welcome.chunk_size or 65536,
                heartbeat_interval=(welcome.heartbeat_ms or 5000) / 1000,
            )
            stream = TunnelStream(
                transport, limits=limits, on_request=self.agent.handle, peer_id="gateway", group=cfg.group,
                label=f"{cfg.client_id}/{self.index}", on_control=self._on_control,
            )
            stream.health_source = self.agent.unhealthy_upstreams
            stream.header_fields = frames.HEADER_FIELDS in welcome.capabilities
            self._goaway.clear()
            self.stream = stream
            self.connects += 1
            self.connected_since = time.time()
            self.agent.last_rejection = ""
            log.info("tunnel connected", extra={"server": cfg.server, "worker": welcome.worker,
                                                 "config_version": welcome.config_version, "connection": self.index})
            run_task = loop.create_task(stream.run())
            goaway = loop.create_task(self._goaway.wait())
            stopping = loop.create_task(stop.wait())
            await asyncio.wait([run_task, goaway, stopping], return_when=asyncio.FIRST_COMPLETED)
            goaway.cancel()
            stopping.cancel()
            if not run_task.done() and self._goaway.is_set() and not stop.is_set():
                # Let in-flight requests finish on the old stream while a new one opens.
                keep_channel = True
                self.draining.add(stream)
                self._drain_tasks.add(run_task)
                run_task.add_done_callback(lambda t, s=stream, ch=channel: self._drained(t, s, ch))
                return "goaway"
            if not run_task.done():
                stream.close("client_stopping")
            await run_task
            log.warning("tunnel lost", extra={"reason": stream.close_reason, "connection": self.index})
            return "served"
        except (grpc.aio.AioRpcError, asyncio.TimeoutError, frames.ProtocolError, ConfigError, OSError) as exc:
            log.warning("cannot reach gateway: %s", _describe(exc), extra={"server": cfg.server,
                                                                           "connection": self.index})
            return "unreachable"
        finally:
            # Returning means this stream takes no new requests.
            self.stream = None
            self.connected_since = None
            if not keep_channel:
                await channel.close()

    def _drained(self, task: asyncio.Task, stream: TunnelStream, channel: grpc.aio.Channel) -> None:
        self._drain_tasks.discard(task)
        self.draining.discard(stream)
        asyncio.get_running_loop().create_task(channel.close())


class Agent:
    def __init__(self, config: ClientConfig, upstreams: UpstreamClients) -> None:
        self.config = config
        self.upstreams = upstreams
        self.dispatcher: RuleDispatcher | None = None
        self.config_version = ""
        self.last_rejection = ""
        self.fatal = ""  # why the agent stopped by itself (the process exits 1)
        self._stop: asyncio.Event | None = None
        self.connections = [Connection(self, i) for i in range(config.connections)]
        self._rr = itertools.count()

    async def handle(self, ex: InboundExchange) -> None:
        # The dispatcher is read once: a config swap does not touch running requests.
        dispatcher = self.dispatcher
        if dispatcher is None:
            ex.reset("upstream_unavailable", "client has no config yet")
            return
        await dispatcher.handle(ex)

    def apply_config(self, version: str, raw: bytes, *, cache: bool = True) -> str:
        """Swap in a group config from the gateway atomically: requests in
        flight finish on the old rules. A bad one keeps the old; returns the
        error ("" when applied)."""
        if version == self.config_version and self.dispatcher is not None:
            return ""
        try:
            group = group_config_from_json(raw, f"gateway config {version}")
        except ConfigError as exc:
            log.error("config from gateway rejected: %s", exc, extra={"config_version": version})
            return str(exc)
        old = self.dispatcher
        self.dispatcher = RuleDispatcher(group.rules, group.upstreams, self.upstreams, self.report_health,
                                         checker=f"tunnel-client {self.config.client_id}")
        self.dispatcher.start()
        if old is not None:
            old.close()
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

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set: by a signal, or by `fail`."""
        self._stop = stop
        await asyncio.gather(*(c.run_forever(stop) for c in self.connections))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
