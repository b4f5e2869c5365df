#!/usr/bin/env python3
"""A small aiohttp backend for the demo, the tests and the benchmark.

GET  /                 a short greeting
GET  /hello            100 bytes
GET  /bytes/N          N bytes (streamed: the head, then the body; ?pause_ms=M between them)
POST /sink             reads the body, answers {"sha256", "size"}
ANY  /echo             answers with the request: method, path, query, headers, body hash
ANY  /slow?ms=N&token=T  waits N ms, answers T (a body's size and sha256 in X-Body-Size, X-Body-Sha256)
GET  /status/N         answers with status N
GET  /cookies          two Set-Cookie headers
GET  /stats            cancellations seen, requests in flight
GET  /ws               WebSocket echo (close:CODE:REASON makes it close)
GET  /sse?n=N&ms=M     N server-sent events, one every M ms, each with its send time
GET  /health           200, or 503 for checkers marked sick (POST/DELETE /sick?name=N)
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import time

from aiohttp import web

HUNDRED = b"x" * 99 + b"\n"
STATS = {"cancelled": 0, "inflight": 0, "requests": 0, "pid": os.getpid()}


async def index(_r: web.Request) -> web.Response:
    return web.Response(text="hello from the demo backend, through the tunnel\n")


async def hello(_r: web.Request) -> web.Response:
    return web.Response(body=HUNDRED, content_type="text/plain")


async def nbytes(r: web.Request) -> web.StreamResponse:
    n = int(r.match_info["n"])
    resp = web.StreamResponse()
    resp.content_length = n
    resp.content_type = "application/octet-stream"
    await resp.prepare(r)
    if "pause_ms" in r.query:  # the head alone for a while, then the body
        await asyncio.sleep(int(r.query["pause_ms"]) / 1000)
    block = b"\xab" * 65536
    left = 0 if r.method == "HEAD" else n  # a HEAD answer has the length but no body
    while left > 0:
        piece = block if left >= len(block) else block[:left]
        await resp.write(piece)
        left -= len(piece)
    await resp.write_eof()
    return resp


async def _hash_body(r: web.Request) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    async for chunk in r.content.iter_chunked(65536):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


async def sink(r: web.Request) -> web.Response:
    digest, size = await _hash_body(r)
    return web.json_response({"sha256": digest, "size": size})


async def echo(r: web.Request) -> web.Response:
    digest, size = await _hash_body(r)
    return web.json_response(
        {
            "method": r.method,
            "path": r.path,
            "raw_path": r.raw_path,
            "query": r.query_string,
            "headers": [[k, v] for k, v in r.headers.items()],
            "sha256": digest,
            "size": size,
            "chunked": r.headers.get("Transfer-Encoding", "") == "chunked",
        }
    )


async def slow(r: web.Request) -> web.Response:
    headers = {}
    if r.body_exists:
        digest, size = await _hash_body(r)
        headers = {"X-Body-Size": str(size), "X-Body-Sha256": digest}
    STATS["inflight"] += 1
    try:
        await asyncio.sleep(int(r.query.get("ms", "1000")) / 1000)
    except asyncio.CancelledError:
        STATS["cancelled"] += 1
        raise
    finally:
        STATS["inflight"] -= 1
    return web.Response(text=r.query.get("token", "done"), headers=headers)


async def status(r: web.Request) -> web.Response:
    code = int(r.match_info["code"])
    return web.Response(status=code, text=None if code in (204, 304) else f"status {code}\n")


async def cookies(_r: web.Request) -> web.Response:
    resp = web.Response(text="cookies\n")
    resp.headers.add("Set-Cookie", "a=1; Path=/")
    resp.headers.add("Set-Cookie", "b=2; Path=/")
    return resp


async def stats(_r: web.Request) -> web.Response:
    return web.json_response(STATS)


async def sse(r: web.Request) -> web.StreamResponse:
    """n server-sent events, one every `ms` ms; each carries the time it was sent."""
    n = int(r.query.get("n", "10"))
    every = int(r.query.get("ms", "100")) / 1000
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(r)
    for i in range(n):
        await resp.write(f"id: {i}\ndata: {time.time():.6f}\n\n".encode())
        await asyncio.sleep(every)
    await resp.write_eof()
    return resp


async def ws_echo(r: web.Request) -> web.WebSocketResponse:
    """Echo every message; 'close:CODE:REASON' makes the server close; the
    close code the client sent is kept in /stats (ws_close)."""
    ws = web.WebSocketResponse(protocols=("echo", "chat"), max_msg_size=16 << 20, autoping=False)
    await ws.prepare(r)
    STATS["ws_open"] = STATS.get("ws_open", 0) + 1
    try:
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    _, code, reason = msg.data.split(":", 2)
                    await ws.close(code=int(code), message=reason.encode())
                    break
                await ws.send_str(msg.data)
            elif msg.type == web.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type == web.WSMsgType.PING:
                await ws.pong(msg.data)
        STATS.setdefault("ws_closes", []).append(ws.close_code)
    finally:
        STATS["ws_open"] -= 1
    return ws


SICK: set[str] = set()


async def health(r: web.Request) -> web.Response:
    """503 for health checks whose User-Agent names a checker marked sick."""
    agent = r.headers.get("User-Agent", "")
    if any(name in agent for name in SICK):
        return web.Response(status=503, text="sick\n")
    return web.Response(text="ok\n")


async def sick(r: web.Request) -> web.Response:
    """POST /sick?name=N marks checker N sick; DELETE heals it."""
    name = r.query["name"]
    (SICK.add if r.method == "POST" else SICK.discard)(name)
    return web.json_response(sorted(SICK))


@web.middleware
async def count(request: web.Request, handler):
    STATS["requests"] += 1
    return await handler(request)


def make_app() -> web.Application:
    app = web.Application(middlewares=[count], client_max_size=1 << 40)
    app.router.add_get("/", index)
    app.router.add_get("/hello", hello)
    app.router.add_get("/bytes/{n:\\d+}", nbytes)
    app.router.add_post("/sink", sink)
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_route("*", "/slow", slow)
    app.router.add_get("/status/{code:\\d+}", status)
    app.router.add_get("/cookies", cookies)
    app.router.add_get("/stats", stats)
    app.router.add_get("/health", health)
    app.router.add_get("/sse", sse)
    app.router.add_get("/ws", ws_echo)
    app.router.add_post("/sick", sick)
    app.router.add_delete("/sick", sick)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(), host=args.host, port=args.port, print=lambda *_: print(f"backend listening on {args.host}:{args.port}", flush=True),
                handler_cancellation=True, access_log=None)


if __name__ == "__main__":
    main()
