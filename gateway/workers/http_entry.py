"""The public HTTP entry: match a route, apply its limits, ask routing for a
client stream (this worker's or another's), relay."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.http.entry import EntryLog, body_problem, forward_headers, head_problem
from gateway.http.headers import apply_rule
from gateway.http.relay import relay_request, send_continue
from gateway.http.websocket import is_websocket
from gateway.http.target import BadTarget, Target, normalise_target, with_host
from gateway.ids import RequestIds, trace_id_from
from gateway.inspection import Capture, process_inspector
from gateway.limits import LimitGate
from gateway.observe import AccessLog, AccessRecord, RequestMetrics
from gateway.quick import group_of, name_of_group
from gateway.rules import Rule, first_match, strip_port
from gateway.tunnel.errors import TunnelError

if TYPE_CHECKING:
    from gateway.config import GatewayConfig, GroupSpec
    from gateway.workers.routing import Routing

__all__ = ["HttpEntry", "hash_key_of", "IDEMPOTENT"]

log = logging.getLogger("gateway.proxy")

# Methods that may be sent twice (RFC 9110 9.2.2) and that the retry takes without `retry = true`.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
# A request's tunnel lost before it reached a client: its stream closed (tunnel_closed), or
# the worker it was sent to holds the client's stream no more (no_client_available: the
# stream closed after the shard table this worker chose by, e.g. that worker stopping).
LOST = frozenset({"tunnel_closed", "no_client_available"})


def hash_key_of(spec: "GroupSpec", request: web.BaseRequest) -> str:
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

    def __init__(self, routing: "Routing", rule: "Rule") -> None:
        cfg = routing.config
        spec = cfg.groups.get(rule.target) or cfg.quick.spec(name_of_group(rule.target))  # type: ignore[union-attr]
        self.rule = rule
        self.spec = spec
        limits = (cfg.max_body_bytes, spec.limits.max_body_bytes, rule.limits.max_body_bytes)
        self.max_body = min(n for n in limits if n)
        self.gates: tuple[LimitGate, ...] = tuple(
            g for g in (routing.limit_gate("group", spec.name, spec.limits),
                        routing.limit_gate("rule", rule.name, rule.limits)) if g is not None)
        self.idle_timeout = rule.idle_timeout or cfg.stream_idle_timeout


class HttpEntry:
    def __init__(self, routing: "Routing", ids: RequestIds, *, access_log: AccessLog,
                 metrics: RequestMetrics) -> None:
        self.routing = routing
        self.book = EntryLog(ids, worker=str(routing.index), direction="ingress", access_log=access_log,
                             metrics=metrics)
        self._plans: dict[int, RoutePlan] = {}  # by id() of a rule of `_plans_for` or `_quick`, which keep it alive
        self._plans_for: "GatewayConfig | None" = None
        self._quick: dict[str, Rule] = {}  # quick tunnels' routes, by name
        self.inspector = process_inspector()  # the last requests, for the admin port (gateway/inspection.py)
        self._inspect_for: "GatewayConfig | None" = None

    def plan(self, rule: "Rule") -> RoutePlan:
        cfg = self.routing.config
        if cfg is not self._plans_for:  # a reload: plan again, with the new limits
            self._plans = {}
            self._quick = {}
            self._plans_for = cfg
        plan = self._plans.get(id(rule))
        if plan is None:
            plan = self._plans[id(rule)] = RoutePlan(self.routing, rule)
        return plan

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        book = self.book
        try:
            # Normalised once: the routes match it and it is what goes on (gateway/http/target.py).
            target = normalise_target(request.raw_path, request.host)
        except BadTarget as exc:
            return self._bad_target(request, str(exc))
        rec = book.record(trace_id=trace_id_from(request.headers), method=request.method, host=target.host,
                          path=target.path_and_query)
        cap = self._capture(rec, request)
        resp = None
        try:
            with book.track(rec):
                resp = await self._admit(request, rec, target, cap)
                rec.status = resp.status
                return resp
        finally:
            if cap is not None:
                cap.finish(resp.headers if resp is not None else None,
                           resp.body if isinstance(resp, web.Response) else None)

    def _capture(self, rec: AccessRecord, request: web.BaseRequest) -> Capture | None:
        """The inspector's capture of a request starting (None with `inspect = false`)."""
        cfg = self.routing.config
        if cfg is not self._inspect_for:  # started, or a reload
            self._inspect_for = cfg
            self.inspector.configure(enabled=cfg.inspect, size=cfg.inspect_requests,
                                     body_bytes=cfg.inspect_body_bytes, mask=cfg.inspect_mask_headers)
        return self.inspector.open(rec, request.raw_headers, request.body_exists)

    def _bad_target(self, request: web.BaseRequest, message: str) -> web.StreamResponse:
        """400 `bad_target`, recorded with the target as it was sent."""
        book = self.book
        rec = book.record(trace_id=trace_id_from(request.headers), method=request.method, host=request.host,
                          path=request.raw_path)
        with book.track(rec):
            resp = book.fail(rec, "bad_target", message, status=400)
            rec.status = resp.status
            return resp

    async def _admit(self, request: web.BaseRequest, rec: AccessRecord, target: Target,
                     cap: Capture | None = None) -> web.StreamResponse:
        """Route the request and hold its limits' gates while it is relayed."""
        cfg = self.routing.config
        refused = head_problem(request, cfg.max_header_bytes)
        if refused is not None:
            return self.book.fail(rec, *refused)
        routes = cfg.routes
        if request.method == "TRACE":  # only a route that names TRACE in its methods takes it
            routes = tuple(r for r in routes if "TRACE" in r.methods)
        rule = first_match(routes, target.host, target.path, request.method, request.headers)
        if rule is None and cfg.quick is not None and request.method != "TRACE":
            rule = self._quick_route(cfg, target.host)
        if rule is None:
            if request.method == "TRACE":
                return self.book.fail(rec, "method_not_allowed", "TRACE is not allowed here", status=405)
            return self.book.fail(rec, "no_matching_rule",
                                  f"no route matches {request.method} {target.host}{target.path}")
        rec.rule = rule.name
        rec.group = rule.target
        plan = self.plan(rule)
        refused = body_problem(request, plan.max_body)
        if refused is not None:
            return self.book.fail(rec, *refused)
        admitted = []
        try:
            for gate in plan.gates:
                verdict = gate.admit()
                if verdict is not None:
                    code, wait = verdict
                    return self.book.fail(rec, code, f"{code.replace('_', ' ')} by the limits of {rule.name!r}",
                                          retry_after=max(1, math.ceil(wait)))
                admitted.append(gate)
            return await self._relay(request, rec, plan, target, cap)
        finally:
            for gate in admitted:
                gate.release()

    def _quick_route(self, cfg: "GatewayConfig", host: str) -> "Rule | None":
        """The route of the quick tunnel `host` names, while one of that name is connected
        (configured routes were tried first: they win)."""
        assert cfg.quick is not None
        name = cfg.quick.name_of(strip_port(host))
        if name is None or not self.routing.candidates(group_of(name)):
            return None
        rule = self._quick.get(name)
        if rule is None:
            if len(self._quick) > 4 * cfg.quick.max_tunnels:  # names come and go: keep the memo bounded
                self._quick, self._plans = {}, {}
            rule = self._quick[name] = Rule(f"quick:{name}", group_of(name), host=cfg.quick.host(name),
                                            timeout=cfg.quick.timeout)
        return rule

    async def _relay(self, request: web.BaseRequest, rec: AccessRecord, plan: RoutePlan,
                     target: Target, cap: Capture | None = None) -> web.StreamResponse:
        rule, spec = plan.rule, plan.spec
        path = rule.rewrite_path(target.path_and_query)
        authority = rule.set_host or target.host
        key = hash_key_of(spec, request) if spec.balance == "consistent_hash" else None
        headers = forward_headers(request, self.routing.config.trusted_proxies)
        headers = apply_rule(with_host(headers, target.host), rule)  # an absolute-form target's host goes on as Host
        deadline = time.monotonic() + rule.timeout  # the route's timeout counts the body read below
        try:
            kept = await self._kept_body(request, rule)
        except TunnelError as exc:
            return self.book.fail_with(rec, exc)
        if cap is not None and kept is not None:
            cap.request_whole(kept)
        failed = ""  # the client whose tunnel was lost under the first attempt
        failed_on = None  # and the stream (or channel to its worker) that lost it
        first_error = ""
        while True:
            chosen = self.routing.choose(spec, authority=authority, path=path, method=request.method,
                                         headers=request.headers, key=key, avoid=failed, avoid_stream=failed_on)
            if chosen is None:
                # A retry that finds none left anywhere after a worker had none: as if none had been.
                if failed and first_error != "no_client_available":
                    return self.book.fail(rec, "tunnel_closed", f"the tunnel to {failed} was lost and group "
                                          f"{spec.name!r} has no other client to retry on")
                return self.book.fail(rec, "no_client_available",
                                      f"no client of group {spec.name!r} is connected", retry_after=1)
            stream, rec.client_id = chosen
            try:
                return await relay_request(
                    request, stream, request_id=rec.request_id, trace_id=rec.trace_id,
                    headers=headers, path=path, authority=authority,
                    timeout=max(0.001, deadline - time.monotonic()), max_body=plan.max_body, group=spec.name,
                    target_client=rec.client_id, idle_timeout=plan.idle_timeout, record=rec,
                    body=kept if kept else None, wire_id=f"{rec.request_id}.2" if failed else "", capture=cap,
                )
            except TunnelError as exc:
                if failed or kept is None or exc.code not in LOST or time.monotonic() >= deadline:
                    return self.book.fail_with(rec, exc)
                # Lost before any byte of the response left: the caller cannot tell a second try.
                failed, failed_on, first_error, rec.retried = rec.client_id, stream, exc.code, True
                log.warning("tunnel lost under a request; retrying once on another client: %s", exc.message,
                            extra={"request_id": rec.request_id, "trace_id": rec.trace_id, "group": spec.name,
                                   "client_id": failed})

    async def _kept_body(self, request: web.BaseRequest, rule: "Rule") -> bytes | None:
        """The body of a request that may be retried, read whole (b"" when it has
        none); None when it may not be: not idempotent and its route does not say
        `retry = true`, a WebSocket, or a body over retry_body_bytes or of unknown length."""
        if request.method not in IDEMPOTENT and not rule.retry:
            return None
        if is_websocket(request.method, request.headers):
            return None  # its messages are its body: they cannot be kept
        if not request.body_exists:
            return b""
        length = request.content_length
        if length is None or length > self.routing.config.retry_body_bytes:
            return None
        await send_continue(request)
        try:
            # Bounded: a caller that declares a body and sends none must not hold the route's gates.
            async with asyncio.timeout(rule.timeout):
                return await request.content.readexactly(length)
        except TimeoutError:
            raise TunnelError("timeout", f"the request body did not arrive within {rule.timeout:g}s") from None
        except Exception as exc:  # the caller's upload broke (short, reset, a bad chunk)
            raise TunnelError("bad_request", f"request body failed: {exc}") from None
