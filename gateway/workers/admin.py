"""The admin port. Any worker answers for all: its own live state plus the
other workers' from the shard table the router broadcasts.

With `admin_token` set (required when admin_host is not loopback), every
endpoint but /healthz asks for `Authorization: Bearer TOKEN` (401 without it):
they change something (drain) or show clients, streams and request counts."""
from __future__ import annotations

import asyncio
import hmac
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Mapping

import orjson
from aiohttp import web

from gateway.config_view import effective_config
from gateway.exposure import foreign_to_loopback
from gateway.grpc_io import grpc_io_in_use
from gateway.history import merge, process_history, view
from gateway.metrics import CONTENT_TYPE_LATEST, render
from gateway.workers.inspector import add_inspector_routes
from gateway.workers.rollout_admin import add_rollout_routes, leader_answer
from gateway.workers.status_page import render_status_page

if TYPE_CHECKING:
    from gateway.workers.worker import Worker

__all__ = ["admin_app", "worker_report", "all_workers", "cluster_view", "node_history"]


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def worker_report(worker: "Worker") -> dict[str, Any]:
    """This worker's row of the shard table: the process, its entry's counts, its streams."""
    book = worker.http_entry.book
    return {
        "worker": worker.index,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": worker.started_at,
        "uptime": round(time.monotonic() - worker.started, 3),
        "requests": book.requests,
        "errors": book.errors,
        "last_minute": book.window.last_minute(),
        "config_versions": worker.routing.config_versions(),
        "stopping": worker.stopping,  # the router takes its silence for a stop, not a loss
        **worker.routing.streams_report(),
    }


def all_workers(worker: "Worker") -> list[dict[str, Any]]:
    """This worker's live info and every other worker's last announce."""
    rows = {worker.index: worker_report(worker)}
    if worker.link is not None:
        for info in worker.link.table.values():
            rows.setdefault(info["worker"], info)
    return [rows[k] for k in sorted(rows)]


def status(worker: "Worker") -> dict[str, Any]:
    workers = all_workers(worker)
    groups: dict[str, int] = {}
    for w in workers:
        for g, n in w["streams"].items():
            groups[g] = groups.get(g, 0) + n
    return {
        "worker": worker.index,
        "workers": len(workers),
        "router": worker.link.router_ok if worker.link else None,
        "streams": [c for w in workers for c in w["clients"]],
        "groups": groups,
        "pending": sum(w["pending"] for w in workers),
        "serving": sum(w["serving"] for w in workers),
        "requests": sum(w["requests"] for w in workers),
        "grpc_io": grpc_io_in_use(),  # the engine this worker started with
    }


def cluster_view(worker: "Worker") -> dict[str, Any]:
    """/admin/cluster: every node of the fleet as this node's router last told (FLEET).
    One host (no `cluster`): this node alone, `registry_up` null, so a script reads
    one shape either way."""
    cfg = worker.config
    if cfg.cluster:
        fleet = worker.link.fleet if worker.link is not None else None
        # Before the router's first word: this node, its registry not known to be up.
        return fleet or {"node_id": cfg.node_id, "registry_up": False, "nodes": []}
    workers = all_workers(worker)
    groups: dict[str, int] = {}
    for w in workers:
        for g, n in w["streams"].items():
            groups[g] = groups.get(g, 0) + n
    node_id = cfg.node_id or socket.gethostname()
    node = {"node_id": node_id, "address": f"{cfg.host}:{cfg.tunnel_port}", "peer": None,
            "state": "draining" if worker.stopping else "serving", "groups": groups, "last_seen": time.time(),
            "started": min(w["started_at"] for w in workers)}
    return {"node_id": node_id, "registry_up": None, "nodes": [node]}


def own_node_id(worker: "Worker") -> str:
    return worker.config.node_id or socket.gethostname()


def _selected(row: dict[str, Any], command: Mapping[str, Any]) -> int:
    """How many of a worker's streams a drain `command` would take (its row of the table)."""
    return sum(1 for c in row.get("clients", ()) if not c.get("draining")
               and all(c.get(key) == command[key] for key in ("client_id", "connection", "group") if key in command))


def drain_targets(worker: "Worker", body: Mapping[str, Any]) -> tuple[str, dict[str, dict]] | web.Response:
    """(node id, {worker name: its row}) a drain `body` names: this node's workers, or with
    "node" another node's ("NODE/wI", reached over the peer link); 404 for a node the fleet
    does not know, 503 for one that is not reachable now."""
    node_id = body.get("node")
    own = own_node_id(worker)
    if node_id is None or node_id == own:
        rows = {f"w{w['worker']}": w for w in all_workers(worker)}
        node_id = own
    else:
        known = cluster_view(worker)["nodes"] if worker.config.cluster else []
        row = next((n for n in known if n["node_id"] == node_id), None)
        if row is None:
            return _json({"error": "unknown_node", "node": str(node_id),
                          "message": "no node of that id in the fleet"}, 404)
        rows = {k: v for k, v in worker.link.remote.items() if k.partition("/")[0] == node_id} \
            if worker.link is not None else {}
        if row["state"] == "unreachable" or not rows:
            return _json({"error": "node_unreachable", "node": node_id,
                          "message": f"node {node_id} is not reachable from this node now"}, 503)
    if "worker" in body:
        rows = {k: v for k, v in rows.items() if v.get("worker") == body["worker"]}
        index = body["worker"]
        if not rows and node_id == own and isinstance(index, int) and 0 <= index < worker.workers:
            # One of ours the shard table does not list yet (just started or respawned): it runs the command.
            rows = {f"w{index}": {"worker": index}}
    return node_id, rows


def _drain_target_missing(body: Mapping[str, Any], rows: Mapping[str, dict[str, Any]],
                          node_id: str) -> web.Response | None:
    """404 when the drain names a worker, or a client (client_id, connection, group), that
    the node does not have; None when it has (a client whose streams all drain already is had)."""
    if "worker" in body and not rows:
        return _json({"error": "unknown_worker", "node": node_id, "worker": body["worker"],
                      "message": f"no worker {body['worker']!r} on node {node_id}"}, 404)
    keys = [k for k in ("client_id", "connection", "group") if k in body]
    if not any(k in body for k in ("client_id", "connection")) or not any("clients" in r for r in rows.values()):
        return None  # rows that list no clients (an older worker's) cannot tell
    if any(all(c.get(k) == body[k] for k in keys) for r in rows.values() for c in r.get("clients", ())):
        return None
    named = ", ".join(f"{k} {body[k]!r}" for k in keys)
    return _json({"error": "unknown_client", "node": node_id, **{k: body[k] for k in keys},
                  "message": f"no client stream with {named} on node {node_id}"
                             + (f" worker {body['worker']!r}" if "worker" in body else "")}, 404)


async def drain_workers(worker: "Worker", rows: Mapping[str, dict[str, Any]],
                        command: Mapping[str, Any]) -> dict[str, Any]:
    """Run a drain on each worker of `rows` and add up their answers. With a limit, one
    worker after another, the most loaded first, each with what is left of it: the limit
    counts streams of all of them (rebalance.py drains one stream of a node)."""
    own = f"w{worker.index}"

    async def one(name: str, cmd: Mapping[str, Any]) -> int | None:
        if name == own:
            return worker.routing.run_command(cmd)
        return await worker.link.ask(name, cmd) if worker.link is not None else None

    counts: dict[str, int | None] = {}
    limit = command.get("limit")
    if limit is None:
        names = sorted(rows)
        counts = dict(zip(names, await asyncio.gather(*(one(n, command) for n in names))))
    else:
        left = limit
        for name in sorted(rows, key=lambda n: (-_selected(rows[n], command), n)):
            if left <= 0:
                break
            counts[name] = n = await one(name, {**command, "limit": left})
            left -= n or 0
    return {
        "drained": sum(n or 0 for n in counts.values()),
        "workers": {k: n for k, n in counts.items() if n is not None},
        "unanswered": sorted(k for k, n in counts.items() if n is None),
        # What this endpoint answered before the counts (kept for scripts that read it).
        "drained_here": counts.get(own) or 0,
        "sent_to_workers": sorted(rows[k]["worker"] for k in counts if k != own),
    }


# How long the graphs wait for the other workers' history: the page must not hang on one.
HISTORY_TIMEOUT = 1.0


async def node_history(worker: "Worker", group: str | None = None) -> dict[str, Any]:
    """/admin/history: this node's last 15 minutes, total and by group, its workers'
    histories added up. This worker asks each other worker of the node for its own
    (op "history" through the router, answered from its process's History) rather than
    have every worker announce 15 minutes of buckets in the shard table every 0.5 s."""
    snapshots = [process_history().snapshot(group)]
    names = sorted(k for k in worker.link.table if k != f"w{worker.index}") if worker.link is not None else []
    command = {"op": "history", **({"group": group} if group is not None else {})}
    answers = await asyncio.gather(*(worker.link.query(n, command, HISTORY_TIMEOUT) for n in names))
    snapshots += answers
    configured = worker.routing.config_versions()
    answer = view(merge(snapshots), group, configured)
    answer["workers"] = {"answered": sorted([f"w{worker.index}", *(n for n, a in zip(names, answers) if a)]),
                         "unanswered": [n for n, a in zip(names, answers) if not a]}
    return answer


# Open without the token: the liveness probe (container health checks).
OPEN_PATHS = frozenset({"/healthz"})


def _token_gate(worker: "Worker") -> Any:
    @web.middleware
    async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
        token = worker.config.admin_token  # read each time: a reload may change it
        if not token and request.path not in OPEN_PATHS:
            foreign = foreign_to_loopback(request.host, request.headers.get("Origin"), request.method)
            if foreign is not None:
                return _json({"error": "forbidden", "message": f"{foreign}: set admin_token to reach the admin "
                                                               "port by another name"}, 403)
        if token and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, f"Bearer {token}".encode()):  # constant time
                return web.Response(
                    body=orjson.dumps({"error": "unauthorized", "message": "send Authorization: Bearer <admin_token>"}),
                    status=401, content_type="application/json", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return gate


def admin_app(worker: "Worker") -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        return _json({"status": "draining" if worker.stopping else "ok", "worker": worker.index},
                     503 if worker.stopping else 200)

    async def get_status(_request: web.Request) -> web.Response:
        return _json(status(worker))

    async def clients(_request: web.Request) -> web.Response:
        """Every connected client stream of every worker."""
        rows = [c for w in all_workers(worker) for c in w["clients"]]
        return _json({"clients": sorted(rows, key=lambda c: (c["group"], c["connection"]))})

    async def shards(_request: web.Request) -> web.Response:
        return _json({"answered_by": worker.index, "workers": all_workers(worker)})

    async def drain(request: web.Request) -> web.Response:
        """Body: {"worker": N} and/or {"client_id": ID} / {"connection": LABEL}, optional "group"
        (client ids and connection labels are per group) and "limit" (of all the workers'
        streams together); in a fleet "node" names the node whose streams go (any node's
        admin takes it)."""
        try:
            body = await request.json(loads=orjson.loads) if request.can_read_body else {}
        except orjson.JSONDecodeError:
            return _json({"error": "bad_request", "message": "body must be JSON"}, 400)
        if not isinstance(body, dict) or not ({"node", "worker", "client_id", "connection"} & set(body)):
            return _json({"error": "bad_request", "message": "give node, worker, client_id or connection"}, 400)
        limit = body.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            return _json({"error": "bad_request", "message": "limit must be a whole number >= 0"}, 400)
        command: dict[str, Any] = {"op": "drain"}
        for key in ("client_id", "connection", "group", "limit"):
            if key in body:
                command[key] = body[key]
        found = drain_targets(worker, body)
        if isinstance(found, web.Response):
            return found
        node_id, rows = found
        missing = _drain_target_missing(body, rows, node_id)
        if missing is not None:
            return missing
        answer = await drain_workers(worker, rows, command)
        if rows and node_id != own_node_id(worker) and len(answer["unanswered"]) == len(rows):
            return _json({"error": "node_unreachable", "node": node_id,
                          "message": f"no worker of node {node_id} answered"}, 503)
        return _json({"node": node_id, **answer})

    async def cluster(_request: web.Request) -> web.Response:
        return _json(cluster_view(worker))

    async def config(_request: web.Request) -> web.Response:
        """The config this worker runs, secrets left out (check-config --diff reads it)."""
        return _json(effective_config(worker.routing.config))

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def history(request: web.Request) -> web.Response:
        """The graphs' data: ?group=G for that group (beside the total), else every group."""
        group = request.query.get("group") or None
        if group is not None and group not in worker.routing.config_versions():
            return _json({"error": "unknown_group", "group": group, "message": "no group of that name"}, 404)
        return _json(await node_history(worker, group))

    async def page(request: web.Request) -> web.Response:
        group = request.query.get("group") or None
        if group not in worker.routing.config_versions():
            group = None  # the page shows every group then
        body = render_status_page(all_workers(worker), worker.routing.config_versions(),
                                  worker.link.router_ok if worker.link else None,
                                  cluster_view(worker) if worker.config.cluster else None,
                                  history=await node_history(worker, group),
                                  rollouts=await leader_answer(worker, {"op": "rollout_report"}))
        return web.Response(text=body, content_type="text/html", headers={"Cache-Control": "no-store"})

    app = web.Application(middlewares=[_token_gate(worker)])
    app.router.add_get("/", page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/status", get_status)
    app.router.add_get("/admin/shards", shards)
    app.router.add_get("/admin/clients", clients)
    app.router.add_get("/admin/cluster", cluster)
    app.router.add_get("/admin/config", config)
    app.router.add_get("/admin/history", history)
    app.router.add_post("/admin/drain", drain)
    add_inspector_routes(app, worker)  # /admin/requests, /inspector (gateway/workers/inspector.py)
    add_rollout_routes(app, worker)  # /admin/rollouts, /admin/reload (gateway/workers/rollout_admin.py)
    return app
