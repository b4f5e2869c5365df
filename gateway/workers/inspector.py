"""The Inspector on the gateway's admin port: the last requests of every worker of
this node (/admin/requests, the /inspector pages) and their replay.

Any worker answers for all: it reads its own ring (gateway/inspection.py) and asks
each other worker for its own through the router (op "requests", like the
graphs' "history"). A replay fetches the captured request, unmasked, from the
worker that holds it (over the internal link only) and sends it again to the
gateway's own HTTP entry on loopback, so it takes the same route as the original:
rules, limits, balancing, a client; it is marked `x-tunnel-replay: ID`."""
from __future__ import annotations

import asyncio
import base64
import ssl
from typing import TYPE_CHECKING, Any, Mapping

import orjson
from aiohttp import web

from gateway.inspection import REPLAY_HEADER, NotReplayable, process_inspector, status_filter
from gateway.inspect_page import html_response, render_detail, render_list, render_refused, replay_answer
from gateway.proxy_protocol import v1_header

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.workers.worker import Worker

__all__ = ["answer_op", "add_inspector_routes", "gather_requests", "replay", "send_again"]

QUERY_TIMEOUT = 2.0  # how long the other workers' rings are waited for: the page must not hang on one
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
CONNECT_TIMEOUT = 5.0
WAIT_FOR_END = 2.0  # a replay's answer waits this long for its response to end (a stream is drained after)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def answer_op(command: Mapping[str, Any]) -> dict[str, Any]:
    """A worker's answer to op "requests": its entries (filtered), or with "replay": ID the
    captured request unmasked (for the asking worker to send again), or why it cannot be."""
    inspector = process_inspector()
    wanted = command.get("replay")
    if isinstance(wanted, str):
        cap = inspector.find(wanted)
        if cap is None:
            return {"missing": True}
        try:
            return {"replay": cap.replay_spec()}
        except NotReplayable as exc:
            return {"refused": {"error": exc.code, "message": exc.message}}
    try:
        return {"requests": inspector.entries(**_filters(command))}
    except (ValueError, TypeError):
        return {"requests": []}


def _filters(q: Mapping[str, Any]) -> dict[str, Any]:
    return {"limit": int(q.get("limit") or DEFAULT_LIMIT), "group": q.get("group") or None,
            "status": q.get("status") or None, "request_id": q.get("id") or None}


def _others(worker: "Worker") -> list[str]:
    link = worker.link
    return sorted(k for k in link.table if k != f"w{worker.index}") if link is not None else []


async def gather_requests(worker: "Worker", query: Mapping[str, Any]) -> dict[str, Any]:
    """/admin/requests: every worker's entries, newest first, cut to the limit."""
    filters = _filters(query)
    own = process_inspector().entries(**filters)
    names = _others(worker)
    command = {"op": "requests", **{k: v for k, v in query.items() if k in ("limit", "group", "status", "id") and v}}
    answers = await asyncio.gather(*(worker.link.query(n, command, QUERY_TIMEOUT) for n in names))
    rows = own + [e for a in answers if a for e in a.get("requests", ())]
    rows.sort(key=lambda e: (e["time"], e["id"]), reverse=True)
    return {"requests": rows[:filters["limit"]],
            "workers": {"answered": sorted([f"w{worker.index}", *(n for n, a in zip(names, answers) if a)]),
                        "unanswered": [n for n, a in zip(names, answers) if not a]}}


async def find_entry(worker: "Worker", request_id: str) -> dict[str, Any] | None:
    found = await gather_requests(worker, {"id": request_id, "limit": 1})
    return found["requests"][0] if found["requests"] else None


def _loopback(host: str) -> str:
    """Where this gateway's HTTP entry is reached from here."""
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    return "::1" if host == "::" else host.strip("[]")


async def send_again(cfg: "GatewayConfig", spec: Mapping[str, Any], spawn: Any = None) -> tuple[int, dict[str, str]]:
    """Send a captured request (replay_spec) to this gateway's HTTP entry on loopback (TLS
    unverified with http_tls; a PROXY header declaring 127.0.0.1 with proxy_protocol).
    Returns the response's status and headers; its body is read and dropped, in the
    background (`spawn`) when it lasts longer than WAIT_FOR_END."""
    host = _loopback(cfg.host)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, cfg.http_port), CONNECT_TIMEOUT)
    try:
        if cfg.proxy_protocol:
            port = writer.get_extra_info("sockname")[1]
            writer.write(v1_header(("::1" if ":" in host else "127.0.0.1", port), (host, cfg.http_port)))
        if cfg.http_tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # our own entry, on loopback
            await asyncio.wait_for(writer.start_tls(ctx), CONNECT_TIMEOUT)
        body = base64.b64decode(spec["body"])
        headers = [(k, v) for k, v in spec["headers"]]
        if not any(k.lower() == "host" for k, _ in headers):
            headers.insert(0, ("Host", spec["host"]))
        if body or spec["method"] in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
        headers += [(REPLAY_HEADER, spec["id"]), ("Connection", "close")]
        head = f"{spec['method']} {spec['target']} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        writer.write(head.encode("utf-8", "surrogateescape") + b"\r\n" + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), cfg.request_timeout + 5)
    except BaseException:
        writer.close()
        raise
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    answer = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            answer.setdefault(name.strip().lower(), value.strip())

    async def drain() -> None:
        try:
            while await asyncio.wait_for(reader.read(65536), cfg.stream_idle_timeout):
                pass
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    # Owned by the worker when given (cancelled at its shutdown); bounded by stream_idle_timeout anyway.
    task = spawn(drain()) if spawn is not None else asyncio.get_running_loop().create_task(drain())
    await asyncio.wait([task], timeout=WAIT_FOR_END)
    return status, answer


async def replay(worker: "Worker", request_id: str) -> tuple[int, dict[str, Any]]:
    """POST /admin/requests/ID/replay: (status, body) — 200 and the new entry, 404 for an id
    no worker keeps, 409 when it cannot be sent again, 502 when sending it failed."""
    answer: dict[str, Any] | None = answer_op({"replay": request_id})
    if answer.get("missing"):
        answers = await asyncio.gather(*(worker.link.query(n, {"op": "requests", "replay": request_id},
                                                           QUERY_TIMEOUT) for n in _others(worker)))
        answer = next((a for a in answers if a and not a.get("missing")), None)
    if answer is None or answer.get("missing"):
        return 404, {"error": "unknown_request", "id": request_id,
                     "message": "no worker keeps a request of that id (the inspector keeps the last ones)"}
    if "refused" in answer:
        return 409, {**answer["refused"], "id": request_id}
    try:
        status, headers = await send_again(worker.config, answer["replay"], worker.spawn)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        return 502, {"error": "replay_failed", "id": request_id,
                     "message": f"sending the request again failed: {type(exc).__name__}"}
    new_id = headers.get("x-request-id", "")
    entry = await find_entry(worker, new_id) if new_id else None
    if entry is None:
        return 502, {"error": "replay_failed", "id": request_id, "status": status,
                     "message": "the replay was answered but no entry of it was found"}
    return 200, entry


def _bad_query(query: Mapping[str, str]) -> str:
    limit = query.get("limit")
    if limit is not None and (not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT):
        return f"limit must be a whole number from 1 to {MAX_LIMIT}"
    if query.get("status"):
        try:
            status_filter(query["status"])
        except ValueError as exc:
            return str(exc)
    return ""


def add_inspector_routes(app: web.Application, worker: "Worker") -> None:
    """The Inspector's endpoints and pages. They show request data: with `admin_token` set
    (required off loopback) admin.py's gate asks for it, as for every admin endpoint."""

    def query_of(request: web.Request) -> dict[str, str]:
        return {k: request.query[k] for k in ("limit", "group", "status") if request.query.get(k)}

    async def requests(request: web.Request) -> web.Response:
        query = query_of(request)
        problem = _bad_query(query)
        if problem:
            return _json({"error": "bad_request", "message": problem}, 400)
        return _json(await gather_requests(worker, query))

    async def replay_json(request: web.Request) -> web.Response:
        status, body = await replay(worker, request.match_info["id"])
        return _json(body, status)

    async def page(request: web.Request) -> web.Response:
        query = query_of(request)
        problem = _bad_query(query)
        rows = [] if problem else (await gather_requests(worker, query))["requests"]
        return html_response(render_list(rows, base="/inspector", query=query, problem=problem, title="tunnel-gateway",
                                 home="/"), 400 if problem else 200)

    async def detail(request: web.Request) -> web.Response:
        entry = await find_entry(worker, request.match_info["id"])
        if entry is None:
            return html_response(render_refused(request.match_info["id"], "unknown_request",
                                        "no worker keeps a request of that id", base="/inspector"), 404)
        return html_response(render_detail(entry, base="/inspector"))

    async def replay_form(request: web.Request) -> web.StreamResponse:
        status, body = await replay(worker, request.match_info["id"])
        return replay_answer(request.match_info["id"], status, body)

    app.router.add_get("/admin/requests", requests)
    app.router.add_post("/admin/requests/{id}/replay", replay_json)
    app.router.add_get("/inspector", page)
    app.router.add_get("/inspector/{id}", detail)
    app.router.add_post("/inspector/{id}/replay", replay_form)

