"""The entries' own HTTP/1.1 server (gateway/http/entry_server.py), in this
process on real sockets: a whole answer is the bytes aiohttp's server writes
for it; pipelined requests are answered in order, one at a time; a malformed
one after good ones is refused after their answers; an unread body is read
away and the connection serves on; a caller that goes away cancels its
handler; an upgrade, after other requests on the same connection, goes to
aiohttp's server. Through a real gateway and client: an upload with a
Content-Encoding goes on as it came (aiohttp's server decoded it, and the
upstream got a body that no longer matched its headers)."""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import re
import time

import pytest
from aiohttp import web

from gateway.http.connections import BoundedServer, EntryLimits
from gateway.http.entry_server import EntryServer
from tests.harness import Stack, http, self_signed_tls

HEADERS = [("Content-Type", "text/plain"), ("X-Thing", "a b")]
# (method, HTTP version, status, headers, body, force_close): each answered by both servers.
CASES = [
    ("GET", "1.1", 200, HEADERS, b"hello", False),
    ("GET", "1.1", 200, [], b"", False),
    ("GET", "1.1", 200, [], None, False),
    ("GET", "1.1", 404, [("Content-Type", "application/json")], b'{"error":"x"}', False),
    ("GET", "1.1", 200, HEADERS, b"hello", True),
    ("GET", "1.0", 200, HEADERS, b"hello", False),
    ("GET", "1.0", 200, HEADERS, b"hello", True),
    ("HEAD", "1.1", 200, [("Content-Length", "1234"), ("Content-Type", "text/html")], b"", False),
    ("HEAD", "1.1", 200, [], b"", False),
    ("GET", "1.1", 204, [("Content-Length", "0")], b"", False),
    ("GET", "1.1", 304, [("ETag", '"abc"')], b"", False),
    ("GET", "1.1", 200, [("Date", "Mon, 01 Jan 2024 00:00:00 GMT"), ("Server", "upstream/1")], b"x", False),
    ("GET", "1.1", 200, [("Connection", "close")], b"x", False),
    ("GET", "1.1", 599, [], b"odd status", False),
    ("GET", "1.1", 200, HEADERS, bytes(range(256)) * 400, False),  # over 16 KiB: written after its head
    ("GET", "1.0", 200, [], bytes(range(256)) * 400, True),
]
DATE = re.compile(rb"\r\nDate: [^\r]+")


def _response_of(case: tuple) -> web.Response:
    _, _, status, headers, body, force_close = case
    resp = web.Response(status=status, headers=headers, body=body)
    if force_close:
        resp.force_close()
    return resp


async def _case_handler(request: web.BaseRequest) -> web.Response:
    return _response_of(CASES[int(request.raw_path.strip("/"))])


async def _exchange(port: int, raw: bytes, quiet: float = 0.3) -> bytes:
    """Send `raw`, read until the server closes or goes quiet for `quiet` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = b""
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), quiet)
        except asyncio.TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    writer.close()
    return data


def _served(handler, raw: bytes, quiet: float = 0.3, **limits) -> bytes:
    """What an entry server of `handler` (with `limits`) sends back for `raw`."""

    async def run() -> bytes:
        entry = await _entry(handler, **limits)
        try:
            return await _exchange(entry.port, raw, quiet)
        finally:
            await entry.shutdown(1)

    return asyncio.run(run())


async def _entry(handler, **limits) -> EntryServer:
    server = EntryServer(handler, limits=EntryLimits(**limits), max_header_bytes=8192)
    await server.listen("127.0.0.1", 0)
    return server


def test_whole_responses_are_the_bytes_aiohttp_writes():
    async def run() -> list[tuple[bytes, bytes]]:
        entry = await _entry(_case_handler)
        bounded = BoundedServer(_case_handler, limits=EntryLimits(), access_log=None)
        aio = await asyncio.get_running_loop().create_server(bounded, "127.0.0.1", 0)
        try:
            out = []
            for i, (method, version, *_rest) in enumerate(CASES):
                raw = f"{method} /{i} HTTP/{version}\r\nHost: x\r\n\r\n".encode()
                got = [await _exchange(port, raw) for port in (entry.port, aio.sockets[0].getsockname()[1])]
                out.append(tuple(DATE.sub(b"\r\nDate: -", g) for g in got))
            return out
        finally:
            aio.close()
            await entry.shutdown(1)

    for case, (ours, aiohttps) in zip(CASES, asyncio.run(run())):
        assert ours.startswith(b"HTTP/1."), case
        assert ours == aiohttps, (case, ours, aiohttps)


def test_a_body_longer_than_its_content_length_is_cut_to_it():
    """Where aiohttp writes the whole body (the rest would be read as the next response),
    ours sends what the length declares. (The relay cuts such a tunnel response itself
    and closes the connection; this is the server's own guard.)"""

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(body=b"hello, and more", headers={"Content-Length": "5"})

    assert _served(handler, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").endswith(b"\r\n\r\nhello")


def test_pipelined_requests_are_answered_in_order_one_at_a_time():
    order = []

    async def handler(request: web.BaseRequest) -> web.Response:
        order.append(("start", request.raw_path))
        if request.raw_path == "/slow":
            await asyncio.sleep(0.2)
        order.append(("end", request.raw_path))
        return web.Response(text=request.raw_path)

    data = _served(handler, b"".join(f"GET /{p} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                                     for p in ("slow", "fast", "fast2")))
    assert re.findall(rb"\r\n\r\n(/[a-z0-9]+)", data) == [b"/slow", b"/fast", b"/fast2"], data
    assert order == [("start", "/slow"), ("end", "/slow"), ("start", "/fast"), ("end", "/fast"),
                     ("start", "/fast2"), ("end", "/fast2")]


@pytest.mark.parametrize("bad", [
    b"GET /x HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"GET /x HTTP/1.1\r\n\r\n",
])
def test_a_malformed_request_after_good_ones_is_refused_after_their_answers(bad):
    served = []

    async def handler(request: web.BaseRequest) -> web.Response:
        served.append(request.raw_path)
        await asyncio.sleep(0.05)
        return web.Response(text="ok")

    good = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    data = _served(handler, good + bad + b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    statuses = re.findall(rb"HTTP/1\.1 (\d+)", data)
    assert statuses == [b"200", b"200", b"400"], data
    assert served == ["/a", "/b"]
    body = json.loads(data.rsplit(b"\r\n\r\n", 1)[1])
    assert body["error"] == "bad_request"


def test_an_unread_body_is_read_away_and_the_connection_serves_on():
    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(text=f"{request.method} {request.raw_path}")  # never reads the body

    async def run() -> bytes:
        entry = await _entry(handler)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", entry.port)
            body = os.urandom(300_000)
            writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:1000])
            first = await asyncio.wait_for(reader.readuntil(b"POST /upload"), 5)
            writer.write(body[1000:] + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            second = await asyncio.wait_for(reader.readuntil(b"GET /next"), 5)
            writer.close()
            return first + second
        finally:
            await entry.shutdown(1)

    data = asyncio.run(run())
    assert re.findall(rb"HTTP/1\.1 (\d+)", data) == [b"200", b"200"]


def test_a_head_over_the_cap_gets_431_and_a_close():
    data = _served(_case_handler, b"GET /0 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 431 ") and b"Connection: close" in data
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"] == "headers_too_large"


def test_a_caller_that_goes_away_cancels_its_handler():
    cancelled = asyncio.Event

    async def run() -> bool:
        gone = cancelled()

        async def handler(request: web.BaseRequest) -> web.Response:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                gone.set()
                raise
            return web.Response(text="late")

        entry = await _entry(handler)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", entry.port)
            writer.write(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.2)
            writer.close()
            await asyncio.wait_for(gone.wait(), 5)
            return not entry.connections
        finally:
            await entry.shutdown(1)

    assert asyncio.run(run())


def test_an_upgrade_after_requests_on_the_same_connection_goes_to_aiohttp():
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text="plain")
        assert isinstance(request, web.BaseRequest)  # aiohttp's own, from here on
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("echo:" + msg.data)
            break
        await ws.close()
        return ws

    async def run() -> bytes:
        entry = await _entry(handler)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", entry.port)
            writer.write(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\nplain"), 5)
            upgraded = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            mask = b"\x01\x02\x03\x04"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"hi"))
            writer.write(b"\x81\x82" + mask + payload)  # a masked text frame, "hi"
            frame = await asyncio.wait_for(reader.readexactly(9), 5)
            writer.close()
            return first + upgraded + frame
        finally:
            await entry.shutdown(1)

    data = asyncio.run(run())
    assert data.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 101 Switching Protocols" in data
    assert data.endswith(b"\x81\x07echo:hi")


def test_a_field_that_never_ends_is_refused_before_it_grows():
    """llhttp keeps a field's pieces until its end: one that never ends gets 431 once it
    passes the head's cap, not after header_timeout with every byte of it held."""

    async def run() -> tuple[bytes, int]:
        entry = await _entry(_case_handler)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", entry.port)
            writer.write(b"GET /0 HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            sent = 0
            answer = asyncio.ensure_future(reader.read())
            while not answer.done() and sent < 4_000_000:
                writer.write(b"a" * 8192)
                sent += 8192
                await asyncio.wait([answer], timeout=0.001)
            got = await asyncio.wait_for(answer, 5)
            writer.close()
            return got, sent
        finally:
            await entry.shutdown(1)

    got, sent = asyncio.run(run())
    assert got.startswith(b"HTTP/1.1 431 ") and b"headers_too_large" in got
    assert sent < 1_000_000, sent  # refused near the cap (64 KiB), not at the end of the stream


def test_a_refusal_waiting_behind_a_slow_answer_does_not_cut_it():
    """The timer that fires while a request is served (header_timeout from accept, here)
    leaves it alone though a malformed request waits behind it."""

    async def handler(request: web.BaseRequest) -> web.Response:
        await asyncio.sleep(0.8)
        return web.Response(text="slow but whole")

    data = _served(handler, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                            b"GET /x HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", quiet=2.0, header_timeout=0.2)
    assert re.findall(rb"HTTP/1\.1 (\d+)", data) == [b"200", b"400"], data
    assert b"slow but whole" in data


def test_a_body_broken_while_its_handler_reads_it_ends_the_connection_at_once():
    """The handler's read fails; its answer goes out and the connection closes (nothing
    after a broken body can be told apart from it), with no wait."""
    got = []

    async def handler(request: web.BaseRequest) -> web.Response:
        try:
            await request.content.read()
        except Exception as exc:
            got.append(type(exc).__name__)
            return web.Response(status=400, text="body failed")
        return web.Response(text="read")

    async def run() -> tuple[bytes, float]:
        entry = await _entry(handler)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", entry.port)
            writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            writer.write(b"zz\r\nbroken\r\n")
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return data, time.monotonic() - t0
        finally:
            await entry.shutdown(1)

    data, took = asyncio.run(run())
    assert data.startswith(b"HTTP/1.1 400 ") and took < 2, (data, took)
    assert got == ["ValueError"]


def test_a_request_without_host_reads_the_address_it_came_to():
    """As aiohttp: an HTTP/1.0 request with no Host has the server's address as its host."""

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(text=request.host)

    assert _served(handler, b"GET / HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\n127.0.0.1")


def test_a_handler_that_fails_mid_answer_cuts_the_connection():
    """No 500 written into the middle of a streamed answer: the connection is cut."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "100"})
        await resp.prepare(request)
        await resp.write(b"half")
        raise RuntimeError("the handler broke")

    data = _served(handler, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nhalf") and b" 500 " not in data


@pytest.mark.parametrize("connection, upgrade", [
    ("Upgrade", True), ("keep-alive, Upgrade", True), ("x-upgrade", False), ("upgraded", False)])
def test_a_websocket_handshake_names_upgrade_as_a_token(connection, upgrade):
    from gateway.http.websocket import is_websocket
    assert is_websocket("GET", {"Upgrade": "websocket", "Connection": connection}) is upgrade


# -- through a real gateway and client ---------------------------------------------------------


@pytest.fixture(scope="module")
def stack(make_module_stack) -> Stack:
    return make_module_stack()


@pytest.mark.parametrize("way", ["ingress", "egress"])
def test_an_encoded_upload_goes_on_as_it_came(stack, way):
    url = stack.url if way == "ingress" else stack.local_url()
    plain = os.urandom(5000)
    encoded = gzip.compress(plain)
    r = http("POST", f"{url}/echo", body=encoded, headers={"Content-Encoding": "gzip"})
    assert r.status == 200, r.body[:300]
    seen = r.json()
    # The backend (aiohttp) decodes what it gets: the plain bytes, so the gzip arrived whole.
    assert seen["sha256"] == hashlib.sha256(plain).hexdigest() and seen["size"] == len(plain)
    assert ["Content-Length", str(len(encoded))] in seen["headers"]


def test_a_websocket_over_tls_is_handed_on_too(tmp_path):
    """The hand-over to aiohttp swaps the protocol under a TLS transport as under a plain one."""
    import aiohttp

    server_ctx, client_ctx = self_signed_tls(tmp_path)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text="plain over " + request.scheme)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(f"{request.scheme}:{msg.data}")
        return ws

    async def run() -> list[str]:
        entry = EntryServer(handler, limits=EntryLimits(), max_header_bytes=8192)
        await entry.listen("127.0.0.1", 0, ssl_context=server_ctx, handshake_timeout=5.0)
        try:
            async with aiohttp.ClientSession() as session:
                url = f"https://127.0.0.1:{entry.port}"
                async with session.get(f"{url}/", ssl=client_ctx) as r:
                    plain = await r.text()
                async with session.ws_connect(f"wss://127.0.0.1:{entry.port}/ws", ssl=client_ctx) as ws:
                    await ws.send_str("one")
                    first = (await ws.receive(timeout=5)).data
                    await ws.send_str("two")
                    second = (await ws.receive(timeout=5)).data
            return [plain, first, second]
        finally:
            await entry.shutdown(1)

    assert asyncio.run(run()) == ["plain over https", "https:one", "https:two"]
