"""Serve requests that arrive on a tunnel by rules and upstreams.

The client serves ingress requests with its group's rules; the gateway serves
egress requests with its forward rules. A config change builds a new
dispatcher; requests already running keep the one they started with. The
dispatcher also keeps its upstreams' health: passive (failed requests) and,
for upstreams with a `health_path`, active checks.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Mapping, Sequence

import aiohttp
import grpc
import grpc.aio
from multidict import CIMultiDict

from gateway.groupconfig import Upstream
from gateway.http.headers import apply_rule
from gateway.http.request_head import check_request_head
from gateway.http.target import BadTarget, normalise_target, with_host
from gateway.rules import Rule, first_match
from gateway.tunnel import frames
from gateway.http.grpc_bridge import MAX_MESSAGE, call_upstream_grpc
from gateway.http.upstream import UpstreamClients, call_upstream, refuse_bad_request
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.exchange import InboundExchange

__all__ = ["RuleDispatcher"]

log = logging.getLogger("gateway.health")

CHECK_TIMEOUT = 5.0

_NONE: Mapping[str, str] = {}


class RuleDispatcher:
    def __init__(self, rules: Sequence[Rule], upstreams: Mapping[str, Upstream], clients: UpstreamClients,
                 on_health_change: Callable[[], None] | None = None, checker: str = "tunnel-gateway") -> None:
        self.rules = tuple(rules)
        # Only rules that look at headers need them as a mapping.
        self._match_headers = any(r.headers for r in self.rules)
        self.upstreams = dict(upstreams)
        self.pools = {name: up.pool() for name, up in upstreams.items()}
        self.clients = clients
        self.session = clients.session
        self.on_health_change = on_health_change
        # Health checks say who sends them, so upstream logs can tell them apart.
        self._check_headers = {"User-Agent": f"tunnel-health-check ({checker})"}
        self._unhealthy = self.unhealthy_upstreams()
        self._checks: list[asyncio.Task] = []
        self._channels: dict[str, grpc.aio.Channel] = {}

    def start(self) -> None:
        """Start the active health checks (needs a running loop)."""
        loop = asyncio.get_running_loop()
        self._checks = [loop.create_task(self._check_loop(up)) for up in self.upstreams.values() if up.health_path]

    def close(self) -> None:
        for t in self._checks:
            t.cancel()
        self._checks = []
        for channel in self._channels.values():
            # Calls still running on it finish first (grace).
            asyncio.get_running_loop().create_task(channel.close(grace=30.0))
        self._channels = {}

    def _grpc_channel(self, server: str) -> grpc.aio.Channel:
        """One channel per upstream server, kept for the dispatcher's life."""
        channel = self._channels.get(server)
        if channel is None:
            target = server.split("://", 1)[1]
            options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
            if server.startswith("https://"):
                channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
            else:
                channel = grpc.aio.insecure_channel(target, options=options)
            self._channels[server] = channel
        return channel

    def unhealthy_upstreams(self) -> list[str]:
        """Upstreams with no healthy server."""
        return sorted(name for name, pool in self.pools.items() if not pool.healthy)

    def _health_maybe_changed(self) -> None:
        now = self.unhealthy_upstreams()
        if now != self._unhealthy:
            log.warning("upstream health changed", extra={"unhealthy": now, "was": self._unhealthy})
            self._unhealthy = now
            if self.on_health_change is not None:
                self.on_health_change()

    async def _check_loop(self, up: Upstream) -> None:
        pool = self.pools[up.name]
        while True:
            for server in up.servers:
                ok = await self._check(server + up.health_path, min(CHECK_TIMEOUT, up.health_interval))
                if ok != pool.is_healthy(server):
                    log.info("health check", extra={"upstream": up.name, "server": server, "healthy": ok})
                pool.set_health(server, ok)
            self._health_maybe_changed()
            await asyncio.sleep(up.health_interval)

    async def _check(self, url: str, timeout: float) -> bool:
        try:
            async with self.session.get(url, headers=self._check_headers,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                await r.read()
                return r.status < 400
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return False

    async def handle(self, ex: InboundExchange) -> None:
        head = ex.head
        try:
            # The peer is untrusted: nothing it sent reaches an upstream unchecked.
            # (The upstream client reads the declared length from the headers it sends: a rule may edit them.)
            pairs, _ = check_request_head(head.method, head.path, frames.header_list(head))
        except TunnelError as exc:
            refuse_bad_request(ex, exc.message)
            return
        host = next((v for n, v in pairs if n.lower() == "host"), "") or head.authority
        try:
            # The peer is untrusted: the rules match the normalised target, and it is what goes on.
            target = normalise_target(head.path, host)
        except BadTarget as exc:
            ex.reset("bad_target", str(exc))
            return
        host, path_only, path = target.host, target.path, target.path_and_query
        pairs = with_host(pairs, host)
        lookup = CIMultiDict(pairs) if self._match_headers else _NONE
        rule = first_match(self.rules, host, path_only, head.method, lookup)
        if rule is None:
            ex.reset("no_matching_rule", f"no rule matches {head.method} {host}{path_only}")
            return
        pool = self.pools[rule.target]
        server = pool.acquire()
        timeout = rule.timeout
        origin_timeout = head.timeout_ms / 1000 if head.timeout_ms else None
        if origin_timeout is not None:
            timeout = min(timeout, origin_timeout)
        # The originator enforces its own head timeout; a stricter rule here
        # (a gateway forward rule for egress, a group rule at the client) is
        # enforced here, or it would never apply.
        head_timeout = rule.timeout if origin_timeout is None or rule.timeout < origin_timeout else None
        try:
            if head.scheme == "grpc":
                ok = await call_upstream_grpc(ex, self._grpc_channel(server), apply_rule(pairs, rule),
                                              rule.rewrite_path(path))
            else:
                ok = await call_upstream(
                    ex, self.clients, server, headers=apply_rule(pairs, rule), path=rule.rewrite_path(path),
                    timeout=timeout, idle_timeout=head.idle_timeout_ms / 1000, head_timeout=head_timeout,
                )
            pool.report(server, ok)
            if not ok:
                self._health_maybe_changed()
        finally:
            pool.release(server)
