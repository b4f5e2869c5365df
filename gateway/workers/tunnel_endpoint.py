"""The tunnel endpoint: accepts a client's stream, checks its HELLO, hands
the stream to routing, and serves the egress requests its client sends up by
the gateway's forward rules."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import TYPE_CHECKING

from gateway.dispatch import RuleDispatcher
from gateway.http.upstream import UpstreamClients
from gateway.metrics import Metrics
from gateway.tls import name_allowed, peer_names
from gateway.tunnel import frames
from gateway.tunnel.exchange import InboundExchange
from gateway.tunnel.stream import TunnelStream
from gateway.tunnel.transport import ServerTransport

if TYPE_CHECKING:
    from gateway.config import GatewayConfig, Token
    from gateway.workers.routing import Routing

__all__ = ["TunnelEndpoint"]

log = logging.getLogger("gateway.tunnel")


def check_token(given: str, allowed: tuple["Token", ...], now: float) -> str | None:
    """None when `given` is a valid token; else the rejection code. Every
    allowed token is compared, in constant time, whatever matches first."""
    matched = None
    for token in allowed:
        if hmac.compare_digest(given.encode(), token.value.encode()):
            matched = token
    if matched is None:
        return "missing_token" if not given else "bad_token"
    return None if matched.valid_at(now) else "token_expired"


class TunnelEndpoint:
    def __init__(self, routing: "Routing", upstreams: UpstreamClients, metrics: Metrics) -> None:
        self.routing = routing
        self.upstreams = upstreams
        self.metrics = metrics
        self.stopping = False
        cfg = routing.config
        self.egress = RuleDispatcher(cfg.forward, cfg.upstreams, upstreams)

    def start(self) -> None:
        self.egress.start()

    def apply_config(self, new: "GatewayConfig") -> None:
        """Egress by the new forward rules; requests running keep the old dispatcher."""
        self.egress.close()
        self.egress = RuleDispatcher(new.forward, new.upstreams, self.upstreams)
        self.egress.start()

    def close(self) -> None:
        self.egress.close()

    async def handle_egress(self, ex: InboundExchange) -> None:
        """A request a client sent up its tunnel: serve it by the forward rules."""
        await self.egress.handle(ex)

    async def _reject(self, transport: ServerTransport, code: str, message: str, peer: str) -> None:
        self.metrics.rejections.labels(code).inc()
        log.warning("tunnel rejected: %s", message, extra={"peer": peer, "code": code})
        await transport.write(frames.encode_frame(frames.welcome(accepted=False, code=code, message=message)))

    def _on_control(self, stream: TunnelStream, f: frames.Frame, kind: str) -> None:
        if kind == "config":
            # The client reports the group config version it applied, or why it refused it.
            if f.config.error:
                log.error("client refused config %s: %s", f.config.config_version, f.config.error,
                          extra={"client_id": stream.peer_id, "group": stream.group})
            else:
                stream.config_version = f.config.config_version
                log.info("client applied config", extra={"client_id": stream.peer_id, "group": stream.group,
                                                         "config_version": f.config.config_version})
        elif kind == "health":
            # Other workers balance by this client's health too: tell them now.
            self.routing.streams_changed()
        elif kind != "goaway":
            stream.unknown_frames += 1

    async def serve(self, transport: ServerTransport) -> None:
        routing = self.routing
        cfg = routing.config
        peer = transport.peer()
        try:
            raw = await asyncio.wait_for(transport.read(), cfg.hello_timeout)
        except asyncio.TimeoutError:
            log.warning("tunnel closed: no HELLO in time", extra={"peer": peer})
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
        group = cfg.groups.get(hello.group)
        if group is None:
            await self._reject(transport, "unknown_group", f"group {hello.group!r} is not configured", peer)
            return
        if cfg.tls_client_ca and group.client_cert_names:
            names = peer_names(transport.auth_context())
            if not name_allowed(names, group.client_cert_names):
                await self._reject(transport, "bad_certificate",
                                   f"client certificate {names} not allowed for group {hello.group!r}", peer)
                return
        refused = check_token(hello.token, group.tokens, time.time())
        if refused is not None:
            await self._reject(transport, refused, f"token not valid for group {hello.group!r} ({refused})", peer)
            return
        if not hello.client_id:
            await self._reject(transport, "protocol_error", "HELLO without client_id", peer)
            return
        label = f"{hello.client_id}/{hello.connection_index}"
        stream = TunnelStream(
            transport, limits=routing.stream_limits(), on_request=self.handle_egress, peer_id=hello.client_id,
            group=hello.group, label=label, on_control=lambda f, kind: self._on_control(stream, f, kind),
        )
        stream.remote = peer  # type: ignore[attr-defined]
        stream.header_fields = frames.HEADER_FIELDS in hello.capabilities
        stream.config_version = group.client.version
        await transport.write(
            frames.encode_frame(
                frames.welcome(
                    accepted=True,
                    config_version=group.client.version,
                    config_json=group.client.to_json(),
                    heartbeat_ms=int(cfg.heartbeat_interval * 1000),
                    worker=str(routing.index),
                    window=cfg.stream_window,
                    chunk_size=cfg.chunk_size,
                    capabilities=[frames.HEADER_FIELDS] if stream.header_fields else [],
                )
            )
        )
        self.metrics.connects.labels(hello.group).inc()
        routing.add_stream(stream)
        log.info("tunnel connected", extra={"peer": peer, "client_id": hello.client_id, "group": hello.group,
                                              "connection": hello.connection_index})
        try:
            await stream.run()
        finally:
            routing.remove_stream(stream)
