"""The admin port's rollout endpoints: GET /admin/rollouts, POST
/admin/rollouts/NAME/promote and /rollback (any worker answers: worker 0
decides, see rollouts.py), and POST /admin/reload (a reload as on SIGHUP)."""
from __future__ import annotations

import asyncio
import os
import signal
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gateway.settings import ConfigError
from gateway.workers.rollouts import LEADER

if TYPE_CHECKING:
    from gateway.workers.worker import Worker

__all__ = ["add_rollout_routes", "leader_answer"]

# How long an admin request waits for worker 0, and for a reload to reach this worker.
LEADER_TIMEOUT = 2.0
RELOAD_WAIT = 5.0


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def leader_answer(worker: "Worker", command: dict[str, Any]) -> Any:
    """What worker 0 answers `command` (this worker is it, or asks it through the router);
    None when it did not answer in time."""
    decider = worker.rollouts.decider()
    if decider is None:
        return None
    if decider == LEADER and worker.rollouts.leader:
        return worker.rollouts.answer(command)
    if worker.link is None:
        return None
    return await worker.link.query(decider, command, LEADER_TIMEOUT)


def _unreachable() -> web.Response:
    return _json({"error": "leader_unreachable",
                  "message": "the worker 0 that decides rollouts did not answer (in a fleet: of the oldest node)"}, 503)


def add_rollout_routes(app: web.Application, worker: "Worker") -> None:
    async def rollouts(_request: web.Request) -> web.Response:
        answer = await leader_answer(worker, {"op": "rollout_report"})
        return _json(answer) if answer is not None else _unreachable()

    async def decide(request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action not in ("promote", "rollback"):
            return _json({"error": "not_found", "message": "POST /admin/rollouts/NAME/promote or /rollback"}, 404)
        reason = ""
        if request.can_read_body:
            try:
                body = await request.json(loads=orjson.loads)
            except orjson.JSONDecodeError:
                return _json({"error": "bad_request",
                              "message": "body must be JSON (optional: {\"reason\": ...})"}, 400)
            if isinstance(body, dict) and isinstance(body.get("reason"), str):
                reason = body["reason"][:200]
        answer = await leader_answer(worker, {"op": "rollout_decide", "group": request.match_info["group"],
                                              "action": action, "reason": reason})
        if not isinstance(answer, dict):
            return _unreachable()
        status = answer.pop("status", 200)
        return _json(answer, status)

    async def reload(_request: web.Request) -> web.Response:
        """Check the config file, then reload it as SIGHUP does; answers once this worker
        runs it (202 when it has not within RELOAD_WAIT: the supervisor's log says why)."""
        if not worker.config_handoff:
            return _json({"error": "not_supported", "message": "this worker has no supervisor to reload from"}, 501)
        from gateway.config import load_gateway_config  # only this endpoint parses the file in a worker

        path = worker.config.path
        try:
            await asyncio.to_thread(load_gateway_config, path, None)
        except ConfigError as exc:
            return _json({"error": "bad_config", "message": "the config file has errors; nothing reloaded",
                          "errors": [e.line for e in exc.errors]}, 400)
        seen = worker.reloads
        os.kill(os.getppid(), signal.SIGHUP)
        for _ in range(int(RELOAD_WAIT / 0.05)):
            if worker.reloads != seen:
                break
            await asyncio.sleep(0.05)
        else:
            return _json({"status": "sent", "file": path, "message": "reload asked; not applied here yet"}, 202)
        return _json({"status": "reloaded", "file": path, "config_versions": worker.routing.config_versions()})

    app.router.add_get("/admin/rollouts", rollouts)
    app.router.add_post("/admin/rollouts/{group}/{action}", decide)
    app.router.add_post("/admin/reload", reload)
