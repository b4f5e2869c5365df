"""The public HTTP entry: match a route, apply its limits, choose a client
stream (this worker's or another's), relay."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.httpmap import apply_rule
from gateway.observe import AccessRecord
from gateway.rules import first_match
from gateway.tunnel.entry import HttpEntryBase

if TYPE_CHECKING:
    from gateway.config import GatewayConfig, GroupSpec
    from gateway.rules import Rule
    from gateway.workers.worker import Worker

__all__ = ["HttpEntry", "hash_key_of"]


def hash_key_of(spec: "GroupSpec", request: web.Request) -> str:
    """The consistent-hash key of a request: a header, a cookie or the client IP."""
    kind, _, name = spec.hash_key.partition(":")
    if kind == "header":
        return request.headers.get(name, "")
    if kind == "cookie":
        return request.cookies.get(name, "")
    return request.remote or ""


class RoutePlan:
    """What serving a route takes, worked out once per config, not per request."""

    __slots__ = ("rule", "spec", "max_body", "gates", "idle_timeout")

    def __init__(self, worker: "Worker", rule: "Rule") -> None:
        cfg = worker.config
        spec = cfg.groups[rule.target]
        self.rule = rule
        self.spec = spec
        limits = (cfg.max_body_bytes, spec.limits.max_body_bytes, rule.limits.max_body_bytes)
        self.max_body = min(n for n in limits if n)
        self.gates = tuple(g for g in (worker.limit_gate("group", spec.name, spec.limits),
                                       worker.limit_gate("rule", rule.name, rule.limits)) if g is not None)
        self.idle_timeout = rule.idle_timeout or cfg.stream_idle_timeout


class HttpEntry(HttpEntryBase):
    direction = "ingress"

    def __init__(self, worker: "Worker", **kw) -> None:
        super().__init__(worker.ids, worker=str(worker.index), **kw)
        self.gateway = worker
        self._plans: dict[int, RoutePlan] = {}  # by id() of a rule of `_plans_for`, which keeps it alive
        self._plans_for: "GatewayConfig | None" = None

    def plan(self, rule: "Rule") -> RoutePlan:
        cfg = self.gateway.config
        if cfg is not self._plans_for:  # a reload: plan again, with the new limits
            self._plans = {}
            self._plans_for = cfg
        plan = self._plans.get(id(rule))
        if plan is None:
            plan = self._plans[id(rule)] = RoutePlan(self.gateway, rule)
        return plan

    async def serve(self, request: web.Request, rec: AccessRecord) -> web.StreamResponse:
        cfg = self.gateway.config
        refused = self.check_head(request, rec, cfg.max_header_bytes)
        if refused is not None:
            return refused
        path_only = request.raw_path.split("?", 1)[0]
        rule = first_match(cfg.routes, request.host, path_only, request.method, request.headers)
        if rule is None:
            return self.fail(rec, "no_matching_rule", f"no route matches {request.method} {request.host}{path_only}")
        rec.rule = rule.name
        rec.group = rule.target
        plan = self.plan(rule)
        refused = self.check_body(request, rec, plan.max_body)
        if refused is not None:
            return refused
        admitted = []
        try:
            for gate in plan.gates:
                verdict = gate.admit()
                if verdict is not None:
                    code, wait = verdict
                    return self.fail(rec, code, f"{code.replace('_', ' ')} by the limits of {rule.name!r}",
                                     retry_after=max(1, math.ceil(wait)))
                admitted.append(gate)
            return await self._relay(request, rec, plan)
        finally:
            for gate in admitted:
                gate.release()

    async def _relay(self, request: web.Request, rec: AccessRecord, plan: RoutePlan) -> web.StreamResponse:
        worker = self.gateway
        rule, spec = plan.rule, plan.spec
        path = rule.rewrite_path(request.raw_path)
        authority = rule.set_host or request.host
        key = hash_key_of(spec, request) if spec.balance == "consistent_hash" else None
        chosen = worker.choose_stream(spec, authority=authority, path=path, method=request.method,
                                      headers=request.headers, key=key)
        if chosen is None:
            return self.fail(rec, "no_client_available", f"no client of group {spec.name!r} is connected",
                             retry_after=1)
        stream, rec.client_id = chosen
        return await self.relay(
            request, rec, stream,
            headers=apply_rule(self.forward_headers(request), rule),
            path=path, authority=authority, timeout=rule.timeout, max_body=plan.max_body,
            group=spec.name, target_client=rec.client_id, idle_timeout=plan.idle_timeout,
        )
