"""The tunnel endpoint: accepts a client's stream, checks its HELLO, hands
the stream to routing, and serves the egress requests its client sends up by
the gateway's forward rules."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from typing import TYPE_CHECKING, Callable

from gateway.dispatch import RuleDispatcher
from gateway.http.entry import EntryLog, ObservedExchange
from gateway.http.upstream import UpstreamClients
from gateway.ids import RequestIds
from gateway.metrics import Metrics
from gateway.observe import AccessLog, AccessRecord
from gateway.tls import name_allowed, peer_names
from gateway.tunnel import frames
from gateway.tunnel.errors import TransportClosed
from gateway.tunnel.exchange import InboundExchange
from gateway.tunnel.stream import TunnelStream
from gateway.tunnel.transport import ServerTransport
from gateway.quick import label_of, name_of_group
from gateway.workers.admission import Admission, source_address
from gateway.workers.quick_tunnels import QuickRefused, admit_quick, quick_group, settle_quick
from gateway.workers.registry import connection_key
from gateway.workers.rollouts import READY_WAIT

if TYPE_CHECKING:
    from gateway.config import GatewayConfig, Token
    from gateway.workers.routing import Routing

__all__ = ["TunnelEndpoint", "check_token", "serving_nodes", "REFUSALS"]

log = logging.getLogger("gateway.tunnel")

# Seconds after a quick tunnel connects that it checks no other process got its name at the same time.
QUICK_SETTLE = 2.0
# Seconds a quick tunnel's WELCOME waits at most for the other workers to hear of it.
QUICK_HEARD = 1.0

# The codes a refused HELLO answers, and what the client is told. An unknown
# group and a wrong token answer alike (the log says which), so an
# unauthenticated client learns nothing of which groups exist. All but
# `draining` are fatal for the client; `protocol_error` answers what is no HELLO.
REFUSALS = {
    "bad_credentials": "group or token not accepted",
    "missing_token": "HELLO carries no token",
    "token_expired": "token expired",
    "bad_certificate": "client certificate not allowed for this group",
    "draining": "this gateway worker is shutting down",
}
# Seconds between two log lines about refusals of one (reason, source or group).
ADMISSION_LOG_EVERY = 10.0
# The fleet's serving nodes are pushed to clients (FLEET) at most this often: the
# router's view comes every heartbeat, and a flapping node must not flood every tunnel.
FLEET_PUSH_EVERY = 1.0


def serving_nodes(fleet: dict | None) -> list[str]:
    """The tunnel addresses of the serving nodes in a FLEET view (router_link's
    `fleet`), sorted. One host (no view): none; the client keeps its --server list,
    and a 0.0.0.0 `host` would not be an address to dial anyway."""
    if not fleet:
        return []
    return sorted({n["address"] for n in fleet.get("nodes", ()) if n.get("state") == "serving" and n.get("address")})


def check_token(given: str, allowed: tuple["Token", ...], now: float) -> str | None:
    """None when `given` is a valid token; else the rejection code. Every
    allowed token is compared, in constant time, whatever matches first."""
    matched = None
    for token in allowed:
        if hmac.compare_digest(given.encode(), token.value.encode()):
            matched = token
    if matched is None:
        return "missing_token" if not given else "bad_credentials"
    return None if matched.valid_at(now) else "token_expired"


def _admission(cfg: "GatewayConfig") -> Admission:
    return Admission(connects_per_source=cfg.tunnel_connects_per_source,
                     failed_hellos_per_source=cfg.tunnel_failed_hellos_per_source,
                     connects_per_group=cfg.tunnel_connects_per_group,
                     failed_hellos_per_group=cfg.tunnel_failed_hellos_per_group,
                     max_streams_per_group=cfg.tunnel_max_streams_per_group, clock=time.monotonic)


def _admission_settings(cfg: "GatewayConfig") -> tuple:
    return (cfg.tunnel_connects_per_source, cfg.tunnel_failed_hellos_per_source, cfg.tunnel_connects_per_group,
            cfg.tunnel_failed_hellos_per_group, cfg.tunnel_max_streams_per_group)


class TunnelEndpoint:
    def __init__(self, routing: "Routing", upstreams: UpstreamClients, metrics: Metrics, *, instance: str = "") -> None:
        self.routing = routing
        self.instance = instance  # the gateway's process group (WELCOME: clients tell two gateways apart)
        self.upstreams = upstreams
        self.metrics = metrics
        # The egress requests this worker serves: access log lines and metrics, as the entries'.
        self.egress_log = EntryLog(RequestIds("egress-"), worker=str(routing.index), direction="egress",
                                   access_log=AccessLog(routing.config.access_log), metrics=metrics,
                                   logger=log, failure="egress request failed")
        self.stopping = False
        cfg = routing.config
        self.egress = RuleDispatcher(cfg.forward, cfg.upstreams, upstreams)
        self.admission = _admission(cfg)
        self._admission_of = _admission_settings(cfg)
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}  # (reason, key) -> (at, refused since)
        self._told: list[str] = []  # the serving nodes the clients were last told
        self._fleet_task: asyncio.Task | None = None
        # The caller behind a grpc peer: set when the port is behind a PROXY relay,
        # whose connections grpc sees as coming from loopback.
        self.resolve_peer: Callable[[str], str] | None = None

    def start(self) -> None:
        self.egress.start()
        self._told = self.fleet_nodes()
        self._fleet_task = asyncio.get_running_loop().create_task(self._push_fleet())

    def _welcome(self, stream: TunnelStream, version: str, config_json: bytes, public_url: str) -> frames.Frame:
        cfg, routing = self.routing.config, self.routing
        return frames.welcome(
            accepted=True,
            config_version=version,
            config_json=config_json,
            public_url=public_url,
            heartbeat_ms=int(cfg.heartbeat_interval * 1000),
            worker=str(routing.index),
            # Every request crosses workers anyway when forced to: nothing to spread over.
            workers=1 if cfg.force_cross_worker else routing.workers,
            instance=self.instance,
            window=cfg.stream_window,
            chunk_size=cfg.chunk_size,
            capabilities=[frames.HEADER_FIELDS] if stream.header_fields else [],
            nodes=self.fleet_nodes(),
        )

    def fleet_nodes(self) -> list[str]:
        link = self.routing.link
        return serving_nodes(getattr(link, "fleet", None))

    async def _push_fleet(self) -> None:
        """Tell every client of this worker when the serving nodes change: checked every
        FLEET_PUSH_EVERY, so at most one push a second and the newest list wins."""
        while True:
            await asyncio.sleep(FLEET_PUSH_EVERY)
            nodes = self.fleet_nodes()
            if nodes == self._told or not nodes:
                continue  # no view (yet, or the router is gone): nothing new to tell
            self._told = nodes
            log.info("fleet changed: telling clients", extra={"nodes": nodes})
            raw = frames.encode_frame(frames.fleet(nodes))
            for stream in list(self.routing.registry):
                if not stream.closed:
                    stream.push_encoded(raw)

    def apply_config(self, new: "GatewayConfig") -> None:
        """Egress by the new forward rules; requests running keep the old dispatcher."""
        self.egress.close()
        self.egress = RuleDispatcher(new.forward, new.upstreams, self.upstreams)
        self.egress.start()
        if _admission_settings(new) != self._admission_of:
            # New bounds start with full buckets; unchanged ones keep what they counted.
            self.admission = _admission(new)
            self._admission_of = _admission_settings(new)

    def close(self) -> None:
        self.egress.close()
        self.egress_log.access_log.close()
        if self._fleet_task is not None:
            self._fleet_task.cancel()

    async def handle_egress(self, ex: InboundExchange) -> None:
        """A request a client sent up its tunnel: serve it by the forward rules, and log
        and count it (direction egress) as the entries do theirs."""
        head = ex.head
        host = next((v for n, v in frames.header_list(head) if n.lower() == "host"), "") or head.authority
        rec = AccessRecord(request_id=ex.request_id, trace_id=ex.trace_id, method=head.method, host=host,
                           path=head.path, worker=self.egress_log.worker, direction="egress")
        rec.client_id, rec.group = ex.stream.peer_id, ex.stream.group
        peer = ex.stream.transport.peer()  # a client's own stream: its gRPC peer (behind PROXY: resolved)
        rec.remote = source_address(self.resolve_peer(peer) if self.resolve_peer is not None else peer)
        with self.egress_log.track(rec):
            if name_of_group(rec.group) is not None:
                # A quick tunnel's token is handed out widely: it opens no way to the backends.
                rec.error, rec.status = "no_matching_rule", 404
                ex.reset("no_matching_rule", "quick tunnels have no egress through the gateway")
                return
            try:
                await self.egress.handle(ObservedExchange(ex, rec))
            finally:
                rec.bytes_out = ex.sender.bytes_sent
                if rec.error:
                    self.egress_log.errors[rec.error] = self.egress_log.errors.get(rec.error, 0) + 1

    async def _reject(self, transport: ServerTransport, code: str, message: str, peer: str, *,
                      reason: str = "", group: str | None = None) -> None:
        """Refuse a HELLO: the client gets `code` (and, for the codes of REFUSALS, only
        their fixed message); the log and the metric keep `message` and `reason`.
        `group` is the name the HELLO gave, configured or not."""
        reason = reason or code
        self.metrics.rejections.labels(reason).inc()
        log.warning("tunnel rejected: %s", message, extra={"peer": peer, "code": code, "reason": reason})
        if code != "draining":
            # Counted before the first await: admission.hello's check and this
            # charge are then one step, however many HELLOs arrive at once.
            self.admission.failed(source_address(peer), group)
        told = REFUSALS.get(code, message)
        await transport.write(frames.encode_frame(frames.welcome(accepted=False, code=code, message=told)))

    def _refuse(self, transport: ServerTransport, reason: str, key: str, peer: str) -> None:
        """Admission turns the connection away: RESOURCE_EXHAUSTED, a metric, and a
        log line at most every ADMISSION_LOG_EVERY seconds per reason and key."""
        self.metrics.admission.labels(reason).inc()
        transport.refuse(f"tunnel admission: too many {reason.replace('_', ' ')}; retry later")
        now = time.monotonic()
        at, count = self._logged.get((reason, key), (0.0, 0))
        if now - at < ADMISSION_LOG_EVERY:
            self._logged[(reason, key)] = (at, count + 1)
            return
        if len(self._logged) > 1000:
            self._logged.clear()
        self._logged[(reason, key)] = (now, 0)
        log.warning("tunnel admission refused a connection", extra={"peer": peer, "reason": reason, "key": key,
                                                                    "refused_before": count})

    def _on_control(self, stream: TunnelStream, f: frames.Frame, kind: str) -> None:
        if kind == "config":
            # The client reports the group config version it applied, or why it refused it.
            if f.config.error:
                log.error("client refused config %s: %s", f.config.config_version, f.config.error,
                          extra={"client_id": stream.peer_id, "group": stream.group})
                stream.config_refused = (f.config.config_version, f.config.error)
                self.routing.streams_changed()  # a rollout's deciding worker reads it from the table
            else:
                stream.config_version = f.config.config_version
                self.routing.streams_changed()
                log.info("client applied config", extra={"client_id": stream.peer_id, "group": stream.group,
                                                         "config_version": f.config.config_version})
        elif kind == "health":
            # Other workers balance by this client's health too: tell them now.
            self.routing.streams_changed()
        elif kind != "goaway":  # a client's GOAWAY (it moves this connection) drains the stream
            stream.unknown_frames += 1

    async def serve(self, transport: ServerTransport) -> None:
        routing = self.routing
        cfg = routing.config
        peer = transport.peer()
        if self.resolve_peer is not None:
            peer = self.resolve_peer(peer)
        source = source_address(peer)
        refused_by = self.admission.connect(source)
        if refused_by is not None:
            self._refuse(transport, refused_by, source, peer)
            return
        try:
            raw = await asyncio.wait_for(transport.read(), cfg.hello_timeout)
        except asyncio.TimeoutError:
            log.warning("tunnel closed: no HELLO in time", extra={"peer": peer})
            return
        except TransportClosed as exc:  # e.g. an oversize first message
            log.warning("tunnel closed before HELLO: %s", exc, extra={"peer": peer, "reason": exc.reason})
            return
        if raw is None:
            return
        try:
            first = frames.decode_batch(raw)
        except frames.ProtocolError as exc:
            await self._reject(transport, "protocol_error", str(exc), peer)
            return
        if len(first) != 1 or first[0].WhichOneof("kind") != "hello":
            await self._reject(transport, "protocol_error", "the first frame must be HELLO", peer)
            return
        hello = first[0].hello
        if self.stopping:
            await self._reject(transport, "draining", "this gateway worker is shutting down", peer)
            return
        # Failures are counted per source and per (group named, source), whether the
        # group exists or not: a guesser's refusals neither reveal groups nor touch
        # another address's clients of the group it names.
        refused_by = self.admission.hello(source, hello.group)
        if refused_by is not None:
            self._refuse(transport, refused_by, source, peer)
            return
        if not hello.token:
            await self._reject(transport, "missing_token", f"HELLO without a token (group {hello.group!r})", peer,
                               group=hello.group)
            return
        quick = bool(hello.quick_upstream)  # `tunnel-client http PORT`: a route made for it
        try:
            group = quick_group(hello, cfg) if quick else cfg.groups.get(hello.group)
        except QuickRefused as exc:
            await self._reject(transport, exc.code, exc.message, peer, group="quick")
            return
        if group is None:
            await self._reject(transport, "bad_credentials", f"group {hello.group!r} is not configured", peer,
                               reason="unknown_group", group=hello.group)
            return
        names = peer_names(transport.auth_context()) if cfg.tls_client_ca else []
        if cfg.tls_client_ca and group.client_cert_names and not name_allowed(names, group.client_cert_names):
            await self._reject(transport, "bad_certificate",
                               f"client certificate {names} not allowed for group {hello.group!r}", peer,
                               group=hello.group)
            return
        refused = check_token(hello.token, group.tokens, time.time())
        if refused is not None:
            await self._reject(transport, refused, f"token not valid for group {hello.group!r} ({refused})", peer,
                               reason="bad_token" if refused == "bad_credentials" else refused, group=hello.group)
            return
        if not hello.client_id:
            await self._reject(transport, "protocol_error", "HELLO without client_id", peer, group=hello.group)
            return
        name = group.name  # the group's, or the quick tunnel's (quick.NAME)
        if group.rollout is not None and not routing.book_ready.is_set():
            # A new node of a fleet: which version the fleet runs comes with its first book.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(routing.book_ready.wait(), READY_WAIT)
        client_version, client_json = routing.client_config(group, hello.client_id)  # the file's or a rollout's
        if quick:
            try:
                client = admit_quick(group, hello, cfg, routing)
                client_version, client_json = client.version, client.to_json()
            except QuickRefused as exc:
                await self._reject(transport, exc.code, exc.message, peer, group="quick")
                return
        # Authenticated: only now is the group charged, so no one without its
        # credentials can spend its connections or streams.
        refused_by = self.admission.admit(name, routing.registry.count(name))
        if refused_by is not None:
            self._refuse(transport, refused_by, name, peer)
            return
        label = f"{hello.client_id}/{hello.connection_index}"
        # Its identity: group, client id and (with mTLS) certificate; only a connection
        # of the same identity and index is replaced by this one.
        key = connection_key(name, hello.client_id, hello.connection_index, frozenset(names) or None)
        stream = TunnelStream(
            transport, limits=routing.stream_limits(), on_request=self.handle_egress, peer_id=hello.client_id,
            group=name, label=label, on_control=lambda f, kind: self._on_control(stream, f, kind),
        )
        stream.remote = peer  # type: ignore[attr-defined]
        stream.certificate = sorted(names)  # type: ignore[attr-defined]
        stream.instance = hello.instance  # type: ignore[attr-defined]
        stream.header_fields = frames.HEADER_FIELDS in hello.capabilities
        stream.config_version = stream.config_sent = client_version
        public_url = cfg.quick.url(name_of_group(name) or "", cfg.http_port) if quick and cfg.quick else ""
        # Registered before its WELCOME (what comes for it waits in its queue, sent after): a
        # quick tunnel's URL, which its user opens at once, is told once every worker can route it.
        routing.add_stream(stream, key)
        try:
            try:
                if quick:
                    await routing.heard(stream, QUICK_HEARD)
                await transport.write(frames.encode_frame(self._welcome(stream, client_version, client_json,
                                                                        public_url)))
            except BaseException:
                stream.close("welcome_failed")
                await asyncio.shield(stream.run())  # fails what was queued for it; nothing is sent
                raise
            self.metrics.connects.labels(label_of(name)).inc()
            if quick:  # once the other workers and nodes have heard of it (a heartbeat or two)
                asyncio.get_running_loop().call_later(QUICK_SETTLE, settle_quick, routing, stream)
            log.info("tunnel connected", extra={"peer": peer, "client_id": hello.client_id, "group": name,
                                                  "connection": hello.connection_index, **(
                                                      {"public_url": public_url} if public_url else {})})
            await stream.run()
        finally:
            routing.remove_stream(stream)
