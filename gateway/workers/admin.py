"""The admin port: health and the worker's live state (streams, pending tables)."""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from gateway.workers.worker import Worker

__all__ = ["admin_app", "worker_status"]


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def worker_status(worker: "Worker") -> dict:
    streams = []
    for s in worker.registry:
        streams.append(
            {
                "client_id": s.peer_id,
                "connection": s.label,
                "group": s.group,
                "remote": getattr(s, "remote", ""),
                "connected_at": s.connected_at,
                "pending": len(s.pending),
                "serving": len(s.serving),
                "peer_inflight": s.peer_inflight,
                "requests_originated": s.requests_originated,
                "requests_served": s.requests_served,
                "unknown_frames": s.unknown_frames,
                "draining": s.draining,
            }
        )
    return {
        "worker": worker.index,
        "pid": os.getpid(),
        "uptime": round(time.monotonic() - worker.started, 3),
        "streams": streams,
        "groups": worker.registry.groups(),
        "pending": sum(s["pending"] for s in streams),
        "serving": sum(s["serving"] for s in streams),
        "requests": worker.http_entry.requests,
        "errors": worker.http_entry.errors,
    }


def admin_app(worker: "Worker") -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        return _json({"status": "draining" if worker.stopping else "ok"}, 503 if worker.stopping else 200)

    async def status(_request: web.Request) -> web.Response:
        return _json(worker_status(worker))

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/admin/status", status)
    return app
