"""The client's Inspector: the requests this client served from the tunnel to its
upstreams (what `tunnel-client http PORT` users want to see reach their port),
on its status port: the page at / (and /inspector), /api/requests and replay.

The exchange the agent hands its dispatcher notes its capture itself: the response
head and body chunks as they pass, the request body as the upstream call reads it
(nothing awaited, nothing copied but a reused buffer, no wrapper in the way). A replay sends the
captured request again straight to the upstream its rules choose (not through
the gateway), marked `x-tunnel-replay: ID`, and keeps it as a new entry."""
from __future__ import annotations

import asyncio
import base64
import itertools
import os
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.exposure import foreign_to_loopback, is_loopback
from gateway.http.headers import apply_rule
from gateway.inspection import REPLAY_HEADER, Capture, Inspector, NotReplayable, status_filter
from gateway.inspect_page import html_response, render_detail, render_list, render_refused, replay_answer
from gateway.observe import AccessRecord
from gateway.rules import first_match
from gateway.tunnel import frames
from gateway.tunnel.exchange import InboundExchange

if TYPE_CHECKING:
    from gateway.client.agent import Agent
    from gateway.client.config import ClientConfig

__all__ = ["client_inspector", "capture", "finish", "add_client_inspector_routes"]

MAX_LIMIT = 1000
REPLAY_TIMEOUT = 30.0


def client_inspector(config: "ClientConfig") -> Inspector | None:
    """The client's ring, when its status port is on and `inspect` is true."""
    if not config.admin_port or not config.inspect:
        return None
    return Inspector(size=config.inspect_requests, body_bytes=config.inspect_body_bytes,
                     mask=config.inspect_mask_headers)


class _HeadHeaders:
    """A tunnel head's headers, kept encoded and decoded only when shown. A decoded
    head held by the ring keeps about 2.6 KB (its message's arena), its bytes a
    seventh of that; the more the ring holds, the colder the memory every later
    request works in (docs/performance.md, "The client's ring")."""

    __slots__ = ("raw",)

    def __init__(self, head: Any) -> None:
        self.raw: bytes = head.SerializeToString()

    def items(self) -> list[tuple[str, str]]:
        return frames.header_list(frames.pb.Headers.FromString(self.raw))


class _ExchangeCapture(Capture):
    """A capture the exchange itself tells of its answer (its `watch`) and its bodies' readers
    and writers of their chunks (their `tap`): nothing stands between the dispatcher and it."""

    __slots__ = ()

    def response_head(self, head: Any) -> None:
        self.rec.status = head.status
        self.response_headers = _HeadHeaders(head)

    def reset(self, code: str) -> None:
        self.rec.error = self.rec.error or code

    def request_read(self, chunk: bytes | None) -> None:
        if chunk is None:
            self.request_end()
        else:
            self.request_chunk(chunk)


def capture(inspector: Inspector, ex: InboundExchange, group: str, client_id: str) -> Capture | None:
    """Start noting `ex` in the inspector's ring: its answer and, but for a WebSocket's
    messages (the handshake only), its bodies. `group`, `client_id`: this client's."""
    head = ex.head
    rec = AccessRecord(request_id=ex.request_id, trace_id=ex.trace_id, method=head.method, host=head.authority,
                       path=head.path, worker="", direction="ingress")
    rec.group = ex.stream.group or group
    rec.client_id = client_id
    cap = inspector.open(rec, _HeadHeaders(head), not head.end_stream, kind=_ExchangeCapture)
    if not isinstance(cap, _ExchangeCapture):  # None: the inspector is off
        return None
    ex.watch = cap
    if head.scheme not in ("ws", "wss"):
        ex.body.tap = cap.request_read
        ex.sender.tap = cap.response_chunk
    return cap


def finish(cap: Capture, ex: InboundExchange, started: float) -> None:
    """The request ended (the upstream answered, failed, or the caller went away)."""
    rec = cap.rec
    rec.duration = time.monotonic() - started
    if ex.body.at_eof:
        cap.request_end()
    if not ex.responded and not rec.error:
        rec.error = ex.cause.code if ex.cause is not None else "cancelled"
    cap.finish()


_replays = itertools.count(1)


async def replay_upstream(agent: "Agent", inspector: Inspector, spec: dict[str, Any]) -> Capture:
    """Send a captured request again to the upstream the group's rules pick, kept as a new entry."""
    dispatcher = agent.dispatcher
    if dispatcher is None:
        raise NotReplayable("no_config", "this client has no group config yet")
    headers = [(k, v) for k, v in spec["headers"]]
    path, _, _query = spec["target"].partition("?")
    rule = first_match(dispatcher.rules, spec["host"], path, spec["method"], CIMultiDict(headers))
    if rule is None:
        raise NotReplayable("no_matching_rule", "no rule of this client's group matches the request now")
    server = dispatcher.pools[rule.target].acquire()
    dispatcher.pools[rule.target].release(server)
    headers = apply_rule(headers, rule) + [(REPLAY_HEADER, spec["id"])]
    body = base64.b64decode(spec["body"])
    rec = AccessRecord(request_id=f"replay-{os.getpid()}-{next(_replays)}", trace_id="", method=spec["method"],
                       host=spec["host"], path=spec["target"], worker="", direction="replay")
    rec.group, rec.client_id = agent.config.group, agent.config.client_id
    cap = Capture(rec, headers, inspector.body_bytes, bool(body))
    cap.request_whole(body)
    inspector.ring.append(cap)
    started = time.monotonic()
    try:
        async with agent.upstreams.session.request(
                spec["method"], server + rule.rewrite_path(spec["target"]), headers=CIMultiDict(headers),
                data=body or None, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=REPLAY_TIMEOUT)) as resp:
            rec.status = resp.status
            cap.response_headers = list(resp.raw_headers)
            async for chunk in resp.content.iter_chunked(65536):
                cap.response_chunk(chunk)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        rec.error = "upstream_unavailable"
        rec.status = rec.status or 502
        cap.response_whole(f"replay failed: {type(exc).__name__}".encode())
    rec.duration = time.monotonic() - started
    cap.finish()
    return cap


def add_client_inspector_routes(app: web.Application, agent: "Agent", inspector: Inspector) -> None:
    """/ and /inspector (the page), /inspector/ID, /api/requests and POST .../ID/replay. Off loopback
    (the status port has no token) they answer 403: request data is not shown to the network."""
    config = agent.config
    title = f"tunnel-client {config.client_id}"

    def closed(request: web.Request) -> web.Response | None:
        foreign = foreign_to_loopback(request.host, request.headers.get("Origin"), request.method)
        if is_loopback(config.admin_host) and foreign is None:
            return None
        return web.Response(status=403, content_type="application/json", body=orjson.dumps(
            {"error": "forbidden", "message": foreign or "the Inspector is served only with admin_host on loopback"}))

    def query_of(request: web.Request) -> tuple[dict[str, str], str]:
        query = {k: request.query[k] for k in ("limit", "group", "status") if request.query.get(k)}
        limit = query.get("limit", "50")
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
            return query, f"limit must be a whole number from 1 to {MAX_LIMIT}"
        try:
            status_filter(query.get("status", "2xx"))
        except ValueError as exc:
            return query, str(exc)
        return query, ""

    def rows(query: dict[str, str]) -> list[dict[str, Any]]:
        return inspector.entries(limit=int(query.get("limit", "50")), group=query.get("group"),
                                 status=query.get("status"))

    async def api(request: web.Request) -> web.Response:
        refused = closed(request)
        if refused is not None:
            return refused
        query, problem = query_of(request)
        if problem:
            return _json({"error": "bad_request", "message": problem}, 400)
        return _json({"requests": rows(query)})

    async def do_replay(request_id: str) -> tuple[int, dict[str, Any]]:
        cap = inspector.find(request_id)
        if cap is None:
            return 404, {"error": "unknown_request", "id": request_id,
                         "message": "the inspector keeps no request of that id"}
        try:
            new = await replay_upstream(agent, inspector, cap.replay_spec())
        except NotReplayable as exc:
            return 409, {"error": exc.code, "id": request_id, "message": exc.message}
        return 200, new.entry(inspector.mask)

    async def replay_json(request: web.Request) -> web.Response:
        refused = closed(request)
        if refused is not None:
            return refused
        status, body = await do_replay(request.match_info["id"])
        return _json(body, status)

    async def page(request: web.Request) -> web.Response:
        query, problem = query_of(request)
        return closed(request) or html_response(render_list([] if problem else rows(query), base="/inspector", query=query,
                                                    problem=problem, title=title, home="/status"))

    async def detail(request: web.Request) -> web.Response:
        cap = inspector.find(request.match_info["id"])
        if cap is None:
            return closed(request) or html_response(render_refused(request.match_info["id"], "unknown_request",
                                                           "the inspector keeps no request of that id",
                                                           base="/inspector"), 404)
        return closed(request) or html_response(render_detail(cap.entry(inspector.mask), base="/inspector"))

    async def replay_form(request: web.Request) -> web.StreamResponse:
        if closed(request) is not None:
            return closed(request)
        status, body = await do_replay(request.match_info["id"])
        return replay_answer(request.match_info["id"], status, body)

    app.router.add_get("/", page)
    app.router.add_get("/inspector", page)
    app.router.add_get("/inspector/{id}", detail)
    app.router.add_post("/inspector/{id}/replay", replay_form)
    app.router.add_get("/api/requests", api)
    app.router.add_post("/api/requests/{id}/replay", replay_json)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")

