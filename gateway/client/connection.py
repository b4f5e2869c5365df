"""One tunnel connection of the client: connect to a node, serve until lost, back
off, again. Which node is the agent's NodeSet's decision (gateway/client/fleet.py);
this module does the I/O: the handshake, and a move to another node made before
the old stream is let go (make-before-break: the group never has zero streams)."""
from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from gateway import __version__
from gateway.backoff import Backoff
from gateway.client.worker_spread import Seat
from gateway.settings import ConfigError
from gateway.tls import channel_credentials, client_ssl_context
from gateway.tunnel import frames
from gateway.tunnel.stream import StreamLimits, TunnelStream
from gateway.tunnel.h2_call import CallFailed, H2Channel, H2ClientTransport
from gateway.tunnel.transport import (CLIENT_KEEPALIVE_MS, CLIENT_MAX_MESSAGE, ClientTransport, Transport,
                                      grpc_options, open_client_call)

if TYPE_CHECKING:
    from gateway.client.agent import Agent

__all__ = ["Connection", "FATAL_REFUSALS", "Refused", "describe"]

log = logging.getLogger("gateway.client")

# A connection that stayed up this long resets the back-off.
HEALTHY_AFTER = 10.0
REJECTED_MIN_DELAY = 15.0
# Refusals no retry can mend: the client stops at the first (exit status 2, as for
# bad config: its credentials are), unless retry_on_reject. `draining` is not one
# (another worker or server takes the client); bad_token and unknown_group are
# what gateways before bad_credentials said.
FATAL_REFUSALS = frozenset({"bad_credentials", "missing_token", "token_expired", "bad_certificate",
                            "bad_token", "unknown_group"})


# A quick tunnel's name refused (taken, not a name) or quick tunnels off: the person who
# ran `tunnel-client http` has to choose again.
QUICK_REFUSALS = frozenset({"name_taken", "bad_name", "quick_disabled"})


class Refused(Exception):
    """The gateway refused this client's credentials (a FATAL_REFUSALS code): the
    process ends with status 2 (`tunnel-client` main says why)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


# The last "reconnecting" line of each agent: (back-off step, when). Its connections
# reconnecting together say it once a step, not once each.
_reconnect_said: "weakref.WeakKeyDictionary[Agent, tuple[int, float]]" = weakref.WeakKeyDictionary()
# A GOAWAY for these means the node goes away (not one worker handing over inside
# it): the connection reconnects to another node.
NODE_LEAVING = frozenset({"shutdown"})
# How long the stream left behind by a move may finish its requests before it is closed.
RETIRE_GRACE = 30.0


@dataclass
class Opened:
    """A stream past its WELCOME, not yet serving."""
    node: str
    channel: grpc.aio.Channel | H2Channel
    stream: TunnelStream
    seat: Seat  # which gateway and worker serve it


class Connection:
    """One tunnel connection; `node` is where its serving stream is (None: not connected)."""

    def __init__(self, agent: "Agent", index: int) -> None:
        self.agent = agent
        self.index = index
        self.stream: TunnelStream | None = None
        self.node: str | None = None
        self.seat: Seat | None = None
        self.draining: set[TunnelStream] = set()
        self.connected_since: float | None = None
        self.connects = 0
        self.moves = 0
        self._goaway = asyncio.Event()
        self.goaway_reason = ""
        self.goaway_node = ""  # the node that sent the last GOAWAY
        self._move = asyncio.Event()
        self._move_to: tuple[str, str] = ("", "")
        self.move_done = asyncio.Event()
        self._drain_tasks: set[asyncio.Task] = set()
        self.refusal: Refused | None = None  # the gateway refused the credentials for good
        self.last_error = ""  # why the last attempt failed
        self._warned = ""  # the failure last logged as a warning (a repeat is logged at debug)

    def request_move(self, node: str, why: str) -> None:
        """Move to `node` (the serving loop opens it, then lets the old stream go); `move_done` is set after."""
        self._move_to = (node, why)
        self.move_done.clear()
        self._move.set()

    def _on_control(self, f: frames.Frame, kind: str) -> None:
        if kind == "config":
            error = self.agent.apply_config(f.config.config_version, f.config.config_json)
            if self.stream is not None:
                # Acknowledge: the version applied, or why not.
                self.stream.push(frames.config(f.config.config_version, b"", error))
        elif kind == "goaway":
            if self.stream is not None and not self.stream.draining:
                return  # for a stream a move left behind: the current one goes on
            self.goaway_reason = f.goaway.reason
            self._goaway.set()
        elif kind == "fleet":
            self.agent.learn(f.fleet.nodes, self.node or "")

    async def run_forever(self, stop: asyncio.Event) -> None:
        cfg = self.agent.config
        backoff = Backoff(cfg.reconnect_initial, cfg.reconnect_max)
        drained_by = ""
        try:
            while not stop.is_set():
                started = time.monotonic()
                outcome = await self._connect_once(
                    self.agent.nodes.target(self.index, self.agent.placed(), drained_by), stop)
                drained_by = ""
                if outcome == "rejected" and self.refusal is not None:
                    raise self.refusal
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
                    if self.goaway_reason == "drain":  # an operator moves it off that node: elsewhere on a tie
                        drained_by = self.goaway_node
                    backoff.reset()
                    continue
                if outcome == "served" and time.monotonic() - started > HEALTHY_AFTER:
                    backoff.reset()
                delay = backoff.next_delay()
                if outcome == "rejected" and self.agent.last_rejection != "draining":
                    # Retrying a refusal fast helps nobody: a few attempts a minute at most.
                    delay = max(delay, REJECTED_MIN_DELAY)
                self._say_reconnecting(backoff.attempt, delay, outcome)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            self.move_done.set()
            for task in list(self._drain_tasks):
                task.cancel()

    def _unreachable(self, node: str, exc: BaseException) -> None:
        """A failed attempt: a warning the first time (this node, this error), then debug
        while it repeats (the "reconnecting" line of each step carries it)."""
        self.last_error = f"{node}: {describe(exc)}"
        level = logging.DEBUG if self.last_error == self._warned else logging.WARNING
        self._warned = self.last_error
        log.log(level, "cannot reach gateway: %s", describe(exc), extra={"server": node, "connection": self.index})

    def _say_reconnecting(self, step: int, delay: float, outcome: str) -> None:
        """One "reconnecting" line a back-off step for the whole client: a connection
        whose sibling said it for this step within its delay stays quiet."""
        now = time.monotonic()
        said = _reconnect_said.get(self.agent)
        if said is not None and said[0] >= step and now - said[1] < max(delay, 1.0):
            return  # a sibling said this step (or a later one) just now
        _reconnect_said[self.agent] = (step, now)
        waiting = [c.index for c in self.agent.connections if c.stream is None]
        log.info("reconnecting", extra={"in_seconds": round(delay, 2), "after": outcome, "step": step,
                                        "connections": waiting, "error": self.last_error if outcome == "unreachable" else "",
                                        "node": self.agent.nodes.target(self.index, self.agent.placed())})

    async def _handshake(self, transport: Transport) -> frames.pb.Welcome | None:
        cfg = self.agent.config
        hello = frames.hello(
            client_id=cfg.client_id, group=cfg.group, token=cfg.token, version=__version__,
            capabilities=["http", frames.HEADER_FIELDS], connection_index=self.index, instance=self.agent.instance,
            quick_upstream=cfg.quick_upstream, quick_name=cfg.quick_name,
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
            fatal = FATAL_REFUSALS | QUICK_REFUSALS if cfg.quick_upstream else FATAL_REFUSALS
            if welcome.code in fatal and not cfg.retry_on_reject:
                self.refusal = Refused(welcome.code, welcome.message)
                self.agent.fail(f"the gateway refused this client ({welcome.code}: {welcome.message}): "
                                f"check its group, token and certificate; it stops (retry_on_reject keeps trying)")
            return None
        return welcome

    async def _channel(self, node: str) -> grpc.aio.Channel | H2Channel:
        cfg = self.agent.config
        if cfg.tunnel_library == "builtin":
            return await self._h2_channel(node)
        options = grpc_options(CLIENT_MAX_MESSAGE, CLIENT_KEEPALIVE_MS, server=False)
        if not (cfg.tls or cfg.tls_ca or cfg.insecure):
            return grpc.aio.insecure_channel(node, options=options)
        # --insecure fetches the gateway's certificate: blocking I/O, off the loop.
        creds, name = await asyncio.get_running_loop().run_in_executor(
            None, lambda: channel_credentials(node, ca=cfg.tls_ca, cert=cfg.tls_cert, key=cfg.tls_key,
                                              insecure=cfg.insecure))
        if name:
            options = options + [("grpc.ssl_target_name_override", name)]
        return grpc.aio.secure_channel(node, creds, options=options)

    async def _h2_channel(self, node: str) -> H2Channel:
        """The connection for tunnel_library = "builtin" (gateway/tunnel/h2_call.py)."""
        cfg = self.agent.config
        if not (cfg.tls or cfg.tls_ca or cfg.insecure):
            return H2Channel(node, max_message=CLIENT_MAX_MESSAGE, connect_timeout=cfg.connect_timeout)
        # --insecure fetches the gateway's certificate: blocking I/O, off the loop.
        ctx, name = await asyncio.get_running_loop().run_in_executor(
            None, lambda: client_ssl_context(node, ca=cfg.tls_ca, cert=cfg.tls_cert, key=cfg.tls_key,
                                             insecure=cfg.insecure))
        return H2Channel(node, max_message=CLIENT_MAX_MESSAGE, ssl_context=ctx, server_hostname=name,
                         connect_timeout=cfg.connect_timeout)

    async def _open(self, node: str) -> Opened | str:
        """Connect to `node` up to its WELCOME: an Opened stream, or the outcome
        ("unreachable", "rejected") when not. A node that cannot take us is marked down, but
        the one this connection serves from (a move to another of its workers failed)."""
        cfg = self.agent.config
        mark_down = self.agent.nodes.mark_down if node != self.node else (lambda _node: None)
        try:
            channel = await self._channel(node)
        except (OSError, ValueError) as exc:
            log.warning("cannot set up the tunnel channel: %s", describe(exc), extra={"server": node})
            mark_down(node)
            return "unreachable"
        transport: Transport = (H2ClientTransport(channel) if isinstance(channel, H2Channel)
                                else ClientTransport(open_client_call(channel), node))
        try:
            welcome = await self._handshake(transport)
            if welcome is None:
                if self.agent.last_rejection == "draining":
                    mark_down(node)
                await channel.close()
                return "rejected"
            self.agent.apply_config(welcome.config_version, welcome.config_json)
            self.agent.learn(welcome.nodes, node)
            if welcome.public_url and self.agent.console is not None:
                self.agent.console.forwarding(welcome.public_url)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError, frames.ProtocolError, ConfigError, OSError) as exc:
            self._unreachable(node, exc)
            mark_down(node)
            await channel.close()
            return "unreachable"
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
        log.info("tunnel connected", extra={"server": node, "worker": welcome.worker, "library": cfg.tunnel_library,
                                             "config_version": welcome.config_version, "connection": self.index})
        return Opened(node, channel, stream, Seat(node, welcome.instance, welcome.worker, welcome.workers))

    def _serving(self, opened: Opened) -> asyncio.Task:
        self._goaway.clear()
        self.stream = opened.stream
        self.node = opened.node
        self.seat = opened.seat
        self.connects += 1
        self.connected_since = time.time()
        self.agent.last_rejection = ""
        self._warned = ""  # connected: the next failure is news again
        return asyncio.get_running_loop().create_task(opened.stream.run())

    def _retire(self, opened: Opened, run_task: asyncio.Task) -> None:
        """Let the old stream's in-flight requests finish while the new one serves; the
        channel closes when it ends (within RETIRE_GRACE)."""
        self.draining.add(opened.stream)
        self._drain_tasks.add(run_task)
        run_task.add_done_callback(lambda t, s=opened.stream, ch=opened.channel: self._drained(t, s, ch))
        asyncio.get_running_loop().call_later(RETIRE_GRACE, opened.stream.close, "moved")

    async def _connect_once(self, node: str, stop: asyncio.Event) -> str:
        opened = await self._open(node)
        if isinstance(opened, str):
            return opened
        loop = asyncio.get_running_loop()
        run_task = self._serving(opened)
        stopping = loop.create_task(stop.wait())
        keep_channel = False
        try:
            while True:
                goaway = loop.create_task(self._goaway.wait())
                moving = loop.create_task(self._move.wait())
                await asyncio.wait([run_task, goaway, stopping, moving], return_when=asyncio.FIRST_COMPLETED)
                goaway.cancel()
                moving.cancel()
                if not (self._move.is_set() and not run_task.done() and not self._goaway.is_set()
                        and not stop.is_set()):
                    break
                self._move.clear()
                moved = await self._move_once(opened, run_task)
                if moved is not None:
                    opened, run_task = moved
                self.move_done.set()
            if not run_task.done() and self._goaway.is_set() and not stop.is_set():
                # Let in-flight requests finish on the old stream while a new one opens.
                keep_channel = True
                self._retire(opened, run_task)
                self.goaway_node = opened.node
                if self.goaway_reason in NODE_LEAVING:
                    self.agent.nodes.mark_down(opened.node)
                log.info("gateway sent GOAWAY", extra={"reason": self.goaway_reason, "server": opened.node,
                                                       "connection": self.index})
                return "goaway"
            if not run_task.done():
                opened.stream.close("client_stopping")
            await run_task
            if not stop.is_set():
                self.agent.nodes.mark_down(opened.node)
            # Stopping is no loss: said at info.
            log.log(logging.INFO if stop.is_set() else logging.WARNING,
                    "tunnel closed: client stopping" if stop.is_set() else "tunnel lost",
                    extra={"reason": opened.stream.close_reason, "server": opened.node, "connection": self.index})
            return "served"
        except (grpc.aio.AioRpcError, asyncio.TimeoutError, frames.ProtocolError, ConfigError, OSError) as exc:
            self._unreachable(opened.node, exc)
            return "unreachable"
        finally:
            stopping.cancel()
            self._move.clear()
            self.move_done.set()
            # Returning means this stream takes no new requests.
            self.stream = None
            self.node = None
            self.seat = None
            self.connected_since = None
            if not keep_channel:
                await opened.channel.close()

    async def _move_once(self, old: Opened, old_task: asyncio.Task) -> tuple[Opened, asyncio.Task] | None:
        """Open the new stream while the old one serves; only then tell the gateway
        the old one goes (GOAWAY: it sends it nothing new and closes it when idle)."""
        node, why = self._move_to
        new = await self._open(node)
        if isinstance(new, str):
            log.info("connection stays: the node it was to move to is unreachable",
                     extra={"connection": self.index, "server": old.node, "to": node, "why": why, "after": new})
            return None
        task = self._serving(new)
        self.moves += 1
        old.stream.push(frames.goaway("moved"))
        self._retire(old, old_task)
        log.info("connection moved", extra={"connection": self.index, "from": old.node, "to": node, "why": why,
                                            "worker": new.seat.worker})
        return new, task

    def _drained(self, task: asyncio.Task, stream: TunnelStream, channel: grpc.aio.Channel | H2Channel) -> None:
        self._drain_tasks.discard(task)
        self.draining.discard(stream)
        asyncio.get_running_loop().create_task(channel.close())


def describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, CallFailed):
        return f"{exc.code}: {exc.details}"  # as grpcio's error reads
    return f"{type(exc).__name__}: {exc}"
