"""The public HTTP entry: match a route, pick a client stream, relay."""
from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.httpmap import apply_rule
from gateway.observe import AccessRecord
from gateway.rules import first_match
from gateway.tunnel.entry import HttpEntryBase

if TYPE_CHECKING:
    from gateway.workers.worker import Worker

__all__ = ["HttpEntry"]


class HttpEntry(HttpEntryBase):
    direction = "ingress"

    def __init__(self, worker: "Worker", **kw) -> None:
        super().__init__(worker.ids, worker=str(worker.index), **kw)
        self.gateway = worker

    async def serve(self, request: web.Request, rec: AccessRecord) -> web.StreamResponse:
        worker = self.gateway
        cfg = worker.config
        refused = self.check_limits(request, rec, cfg.max_header_bytes, cfg.max_body_bytes)
        if refused is not None:
            return refused
        path_only = request.raw_path.split("?", 1)[0]
        rule = first_match(cfg.routes, request.host, path_only, request.method, request.headers)
        if rule is None:
            return self.fail(rec, "no_matching_rule", f"no route matches {request.method} {request.host}{path_only}")
        rec.rule = rule.name
        rec.group = rule.target
        group = cfg.groups[rule.target]
        # Prefer a stream this worker owns; else a worker that has one, through the router.
        stream = worker.registry.pick(group.name, group.balance)
        if stream is None and worker.link is not None:
            stream = worker.link.route(group.name)
        if stream is None:
            return self.fail(rec, "no_client_available", f"no client of group {group.name!r} is connected",
                             retry_after=1)
        return await self.relay(
            request, rec, stream,
            headers=apply_rule(self.forward_headers(request), rule),
            path=rule.rewrite_path(request.raw_path),
            authority=rule.set_host or request.host,
            timeout=rule.timeout,
            max_body=cfg.max_body_bytes,
            group=group.name,
        )
