"""The client's local HTTP entry: egress requests go up the tunnel."""
from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.ids import RequestIds, new_instance_id
from gateway.observe import AccessRecord
from gateway.tunnel.entry import HttpEntryBase

if TYPE_CHECKING:
    from gateway.client.agent import Agent

__all__ = ["LocalEntry"]


class LocalEntry(HttpEntryBase):
    direction = "egress"

    def __init__(self, agent: "Agent", **kw) -> None:
        super().__init__(RequestIds(f"c{new_instance_id()}-"), worker="client", **kw)
        self.agent = agent

    async def serve(self, request: web.Request, rec: AccessRecord) -> web.StreamResponse:
        cfg = self.agent.config
        rec.client_id = cfg.client_id
        rec.group = cfg.group
        refused = self.check_head(request, rec, cfg.max_header_bytes) or self.check_body(request, rec, cfg.max_body_bytes)
        if refused is not None:
            return refused
        stream = self.agent.pick_stream()
        if stream is None:
            return self.fail(rec, "tunnel_unavailable", "the tunnel to the gateway is not connected",
                             status=503, retry_after=1)
        return await self.relay(
            request, rec, stream, headers=self.forward_headers(request), path=request.raw_path,
            authority=request.host, timeout=cfg.request_timeout, max_body=cfg.max_body_bytes,
            idle_timeout=cfg.stream_idle_timeout,
        )
