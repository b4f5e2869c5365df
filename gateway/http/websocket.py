"""WebSocket through a tunnel stream.

After the upstream's 101, each side's messages travel as the exchange's body,
with the same flow control as any body: each message is framed as
[type: 1 byte][length: 4 bytes][payload], so DATA chunk boundaries do not
matter. Close carries its code (2 bytes) and reason. Both halves live here:
`bridge_entry` (an aiohttp WebSocketResponse at the entry) and
`bridge_upstream` (an aiohttp client WebSocket at the serving side).
"""
from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from yarl import URL

from gateway.tunnel.errors import TunnelError
from gateway.http.length_prefixed import Decoder, encode
from gateway.tunnel.body import BodyReader, BodyWriter

MAX_MESSAGE = 16 << 20

__all__ = ["MAX_MESSAGE", "is_websocket", "bridge_entry", "bridge_upstream", "UPSTREAM_DROP",
           "TEXT", "BINARY", "PING", "PONG", "CLOSE"]

log = logging.getLogger("gateway.websocket")

TEXT, BINARY, CLOSE, PING, PONG = 1, 2, 8, 9, 10
# Handshake headers the upstream-side client makes itself.
UPSTREAM_DROP = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                           "sec-websocket-protocol"})
# What users see when the far side is lost: 1011 tunnel lost, 1014 upstream failed.
CLOSE_TUNNEL_LOST = 1011
CLOSE_BAD_GATEWAY = 1014


def is_websocket(method: str, headers: Any) -> bool:
    """A WebSocket handshake: a GET whose Upgrade names websocket and whose Connection
    names upgrade (as tokens: `Connection: x-upgrade` is not one, as llhttp and aiohttp read it)."""
    if method != "GET":
        return False
    upgrade = headers.get("Upgrade", "")
    # The substring first: most requests have no Upgrade, and they stop here.
    return ("websocket" in upgrade.lower() and _has_token(upgrade, "websocket")
            and _has_token(headers.get("Connection", ""), "upgrade"))


def _has_token(value: str, token: str) -> bool:
    return any(t.strip().lower() == token for t in value.split(","))


def close_payload(code: int, reason: str) -> bytes:
    return struct.pack("!H", code) + reason.encode()


def parse_close(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2:
        return 1005, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode(errors="replace")


async def _to_tunnel(ws: Any, sender: BodyWriter) -> tuple[int, str]:
    """Messages of a local WebSocket into the tunnel; returns the close it saw."""
    while True:
        msg = await ws.receive()
        if msg.type == WSMsgType.TEXT:
            await sender.write(encode(TEXT, msg.data.encode()))
        elif msg.type == WSMsgType.BINARY:
            await sender.write(encode(BINARY, msg.data))
        elif msg.type == WSMsgType.PING:
            await sender.write(encode(PING, msg.data))
        elif msg.type == WSMsgType.PONG:
            await sender.write(encode(PONG, msg.data))
        elif msg.type == WSMsgType.CLOSE:
            code, reason = msg.data or 1005, msg.extra or ""
            if not ws.closed:
                # Complete the close handshake at once (the upstream side does not autoclose).
                await ws.close(code=code, message=reason.encode())
            break
        else:  # CLOSING, CLOSED, ERROR: the connection went away
            code, reason = ws.close_code or 1006, ""
            break
    await sender.write(encode(CLOSE, close_payload(code, reason)))
    sender.end()
    return code, reason


async def _from_tunnel(body: BodyReader, ws: Any, max_message: int) -> tuple[int, str] | None:
    """Messages from the tunnel onto a local WebSocket; returns the close the far side sent."""
    decoder = Decoder(max_message)
    while (chunk := await body.read()) is not None:
        for kind, payload in decoder.feed(chunk):
            if kind == TEXT:
                await ws.send_str(payload.decode())
            elif kind == BINARY:
                await ws.send_bytes(payload)
            elif kind == PING:
                await ws.ping(payload)
            elif kind == PONG:
                await ws.pong(payload)
            elif kind == CLOSE:
                return parse_close(payload)
    return None


async def _bridge(ws: Any, body: BodyReader, sender: BodyWriter, max_message: int) -> tuple[int, str]:
    """Pump both ways until one side closes; close the other side alike."""
    loop = asyncio.get_running_loop()
    up = loop.create_task(_to_tunnel(ws, sender))
    down = loop.create_task(_from_tunnel(body, ws, max_message))
    try:
        done, _ = await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        if down in done:
            exc = down.exception()
            if exc is not None:
                code = CLOSE_TUNNEL_LOST if isinstance(exc, TunnelError) and exc.code == "tunnel_closed" \
                    else CLOSE_BAD_GATEWAY
                await ws.close(code=code, message=str(getattr(exc, "code", "error")).encode())
                return code, "lost"
            far = down.result() or (1000, "")
            # 1005/1006/1015 describe a close, they cannot be sent: the far side went away.
            code = 1001 if far[0] in (1005, 1006, 1015) else far[0]
            await ws.close(code=code, message=far[1].encode())
            # Tell the far side we closed too, unless the pump is gone already.
            try:
                await asyncio.wait_for(up, 2.0)
            except (asyncio.TimeoutError, TunnelError):
                pass
            return far
        code, reason = up.result()
        # Our side closed; give the far side a moment to answer with its close.
        try:
            await asyncio.wait_for(down, 2.0)
        except (asyncio.TimeoutError, TunnelError):
            pass
        return code, reason
    finally:
        for t in (up, down):
            if not t.done():
                t.cancel()


async def bridge_entry(request: web.Request, ex: Any, headers: list[tuple[str, str]],
                       max_message: int) -> web.WebSocketResponse:
    """The entry's side: answer the caller's upgrade, then pump messages.
    `headers`: the 101's, checked (`gateway.http.response_head`)."""
    protocols = [v for n, v in headers if n.lower() == "sec-websocket-protocol"]
    ws = web.WebSocketResponse(protocols=protocols, autoping=False, max_msg_size=max_message)
    ws.headers["x-request-id"] = ex.request_id
    ws.headers["x-trace-id"] = ex.trace_id
    await ws.prepare(request)
    await _bridge(ws, ex.body, ex.sender, max_message)
    return ws


async def bridge_upstream(ex: Any, session: aiohttp.ClientSession, url: str, headers: list[tuple[str, str]],
                          timeout: float, max_message: int) -> bool:
    """The serving side: open the upstream WebSocket, answer 101, pump messages.
    False when the upstream could not be reached (passive health)."""
    protocols = [p.strip() for n, v in headers if n.lower() == "sec-websocket-protocol" for p in v.split(",")]
    sent = [(n, v) for n, v in headers if n.lower() not in UPSTREAM_DROP]
    try:
        ws = await session.ws_connect(URL(url, encoded=True), headers=sent, protocols=protocols, autoping=False,
                                      max_msg_size=max_message, timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                                      autoclose=False)
    except aiohttp.WSServerHandshakeError as exc:
        ex.respond(exc.status, exc.message or "", [], end_stream=True)
        return True
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        log.warning("upstream websocket %s failed: %s", url, exc, extra={"request_id": ex.request_id})
        # The log has the upstream's address; the caller's answer never does.
        ex.reset("upstream_unavailable", f"the upstream refused or failed ({type(exc).__name__}); "
                                         f"the log has the detail under request_id {ex.request_id}")
        return False
    async with ws:
        reply = [("Upgrade", "websocket"), ("Connection", "Upgrade")]
        if ws.protocol:
            reply.append(("Sec-WebSocket-Protocol", ws.protocol))
        ex.respond(101, "Switching Protocols", reply, end_stream=False)
        await _bridge(ws, ex.body, ex.sender, max_message)
    return True
