"""Serve requests that arrive on a tunnel by rules and upstreams.

The client serves ingress requests with its group's rules; the gateway serves
egress requests with its forward rules. A config change builds a new
dispatcher; requests already running keep the one they started with.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import aiohttp
from multidict import CIMultiDict

from gateway.groupconfig import Upstream
from gateway.httpmap import apply_rule
from gateway.rules import Rule, first_match
from gateway.tunnel import frames
from gateway.tunnel.proxy import call_upstream
from gateway.tunnel.stream import InboundExchange

__all__ = ["RuleDispatcher"]


class RuleDispatcher:
    def __init__(self, rules: Sequence[Rule], upstreams: Mapping[str, Upstream], session: aiohttp.ClientSession) -> None:
        self.rules = tuple(rules)
        self.pools = {name: up.pool() for name, up in upstreams.items()}
        self.session = session

    async def handle(self, ex: InboundExchange) -> None:
        head = ex.head
        pairs = frames.headers_to_pairs(head.headers)
        lookup = CIMultiDict(pairs)
        path_only = head.path.split("?", 1)[0]
        host = lookup.get("host") or head.authority
        rule = first_match(self.rules, host, path_only, head.method, lookup)
        if rule is None:
            ex.reset("no_matching_rule", f"no rule matches {head.method} {host}{path_only}")
            return
        pool = self.pools[rule.target]
        server = pool.acquire()
        timeout = rule.timeout
        if head.timeout_ms:
            timeout = min(timeout, head.timeout_ms / 1000)
        try:
            await call_upstream(
                ex, self.session, server, headers=apply_rule(pairs, rule), path=rule.rewrite_path(head.path), timeout=timeout
            )
        finally:
            pool.release(server)
