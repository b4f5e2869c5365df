"""Every connection to an HTTP entry is bounded (issue 17, item 3): in time
(header_timeout from accept and from the first byte after a response,
keepalive_timeout when idle) and in count (max_connections), on the
gateway's public entry and on the client's local entry alike."""
from __future__ import annotations

import asyncio
import re
import ssl
import time
import urllib.request

import pytest
from aiohttp import web

from gateway.http.connections import BoundedServer, EntryLimits
from gateway.http.entry_connection import EntryConnection
from gateway.http.entry_server import EntryServer
from tests.harness import Stack, self_signed_tls

HEADER_TIMEOUT = 2.0
KEEPALIVE_TIMEOUT = 4.0
LIMITS = {"header_timeout": HEADER_TIMEOUT, "keepalive_timeout": KEEPALIVE_TIMEOUT}
CLIENT_LIMITS = ["--header-timeout", str(HEADER_TIMEOUT), "--keepalive-timeout", str(KEEPALIVE_TIMEOUT)]
REQUEST = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"


def _dropped(url: str, entry: str, reason: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    m = re.search(rf'tunnel_http_connections_dropped_total{{entry="{entry}",reason="{reason}"}} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


async def _response(reader: asyncio.StreamReader) -> bytes:
    """One whole response (with a Content-Length) off a keep-alive connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return head + await reader.readexactly(int(length.group(1)) if length else 0)


async def _closed_after(reader: asyncio.StreamReader, t0: float) -> tuple[float, bytes]:
    """(seconds from t0 until the server closed the connection, what it sent)."""
    got = await asyncio.wait_for(reader.read(), 30)
    return time.monotonic() - t0, got


async def _dribbler(port: int) -> tuple[float, bytes]:
    """A head that never ends: one byte every 0.5 s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    closed = asyncio.ensure_future(_closed_after(reader, t0))
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    try:
        while not closed.done():
            writer.write(b"a")
            await asyncio.wait([closed], timeout=0.5)
    except ConnectionError:
        pass
    writer.close()
    return await closed


async def _silent(port: int) -> tuple[float, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await _closed_after(reader, time.monotonic())
    finally:
        writer.close()


async def _request(port: int) -> tuple[float, bytes]:
    """One request on a fresh connection: (seconds, the response)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    got = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return time.monotonic() - t0, got


async def _attack(port: int, dribblers: int, silent: int) -> dict:
    baseline = [await _request(port) for _ in range(10)]
    attack = [asyncio.ensure_future(_dribbler(port)) for _ in range(dribblers)]
    attack += [asyncio.ensure_future(_silent(port)) for _ in range(silent)]
    await asyncio.sleep(0)
    during = []
    while not all(t.done() for t in attack) and len(during) < 200:
        during.append(await _request(port))
        await asyncio.sleep(0.02)
    results = await asyncio.gather(*attack)
    return {"baseline": baseline, "during": during, "dribblers": results[:dribblers], "silent": results[dribblers:]}


@pytest.fixture(scope="module")
def stack(make_module_stack) -> Stack:
    return make_module_stack(settings={"workers": 1, "max_body_bytes": 1000, **LIMITS}, client_extra=CLIENT_LIMITS)


def _check_attack(outcome: dict) -> None:
    for took, got in outcome["dribblers"]:
        assert HEADER_TIMEOUT - 0.2 < took < HEADER_TIMEOUT + 1.0, took
        assert got.startswith(b"HTTP/1.1 408 "), got[:100]  # it sent part of a head: 408, then closed
    for took, got in outcome["silent"]:
        assert HEADER_TIMEOUT - 0.2 < took < HEADER_TIMEOUT + 1.0, took
        assert got == b""  # it sent nothing: closed without a word
    assert outcome["during"], "no legitimate request ran during the attack"
    for took, got in outcome["baseline"] + outcome["during"]:
        assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    base = sorted(t for t, _ in outcome["baseline"])[-1]
    worst = sorted(t for t, _ in outcome["during"])[-1]
    assert worst < max(2 * base, 0.25), (worst, base)


def test_slowloris_closed_after_header_timeout(stack):
    """50 connections dribbling a head and 20 silent ones, at the public entry and at the
    client's local entry at once: each closed within header_timeout + 1 s, while legitimate
    requests go on as fast as before; the metric counts them."""
    local = stack.clients["c1"][1]
    admin = f"http://127.0.0.1:{stack.admin_port}"
    client_admin = f"http://127.0.0.1:{stack.clients['c1'][2]}"
    before = _dropped(admin, "http", "header_timeout"), _dropped(client_admin, "local", "header_timeout")

    async def both() -> list[dict]:
        return await asyncio.gather(_attack(stack.http_port, 50, 20), _attack(local, 20, 10))

    public, egress = asyncio.run(both())
    _check_attack(public)
    _check_attack(egress)
    assert _dropped(admin, "http", "header_timeout") - before[0] == 70
    assert _dropped(client_admin, "local", "header_timeout") - before[1] == 30


def test_idle_keepalive_outlives_header_timeout_then_ends(stack):
    """After a response, an idle connection is kept for keepalive_timeout (not cut at
    header_timeout); a head begun after a response gets header_timeout from its first byte."""

    async def run() -> None:
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", stack.http_port)
        slow_r, slow_w = await asyncio.open_connection("127.0.0.1", stack.http_port)
        for w in (idle_w, slow_w):
            w.write(REQUEST)
        for r in (idle_r, slow_r):
            assert (await _response(r)).startswith(b"HTTP/1.1 200 ")
        # A fresh silent connection, opened now, is cut at header_timeout: wait for that ...
        took, got = await _silent(stack.http_port)
        assert got == b"" and took < HEADER_TIMEOUT + 1.0
        # ... the idle keep-alive connection lives on and serves the next request.
        idle_w.write(REQUEST)
        assert (await _response(idle_r)).startswith(b"HTTP/1.1 200 ")
        answered = time.monotonic()
        # The other starts its next head, then stalls: 408 at header_timeout from that byte.
        slow_w.write(b"GET /hel")
        t0 = time.monotonic()
        took, got = await _closed_after(slow_r, t0)
        assert got.startswith(b"HTTP/1.1 408 ") and HEADER_TIMEOUT - 0.2 < took < HEADER_TIMEOUT + 1.0, (took, got)
        # And the idle one ends at keepalive_timeout after its last response.
        took, got = await _closed_after(idle_r, answered)
        assert got == b"" and KEEPALIVE_TIMEOUT - 0.2 < took < KEEPALIVE_TIMEOUT + 1.0, took
        for w in (idle_w, slow_w):
            w.close()

    asyncio.run(run())


def test_the_rest_of_a_refused_body_is_no_head(stack):
    """A body the entry refused (413) that goes on arriving slowly is read away (aiohttp
    lingers) and never taken for a late head: no 408 after the 413."""

    async def run() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.http_port)
        writer.write(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100)
        answer = await _response(reader)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        after = b""
        t0 = time.monotonic()
        while time.monotonic() - t0 < HEADER_TIMEOUT + 1.0 and not reader.at_eof():
            writer.write(b"x" * 10)
            try:
                after += await asyncio.wait_for(reader.read(4096), 0.3)
            except asyncio.TimeoutError:
                pass
        writer.close()
        return after

    assert b"408" not in asyncio.run(run())


def test_max_connections_refuses_and_counts(make_stack):
    limit = 10
    stack = make_stack(settings={"workers": 1, "max_connections": limit},
                       client_extra=["--max-connections", str(limit)])
    for port, admin, entry in ((stack.http_port, f"http://127.0.0.1:{stack.admin_port}", "http"),
                               (stack.clients["c1"][1], f"http://127.0.0.1:{stack.clients['c1'][2]}", "local")):

        async def run() -> None:
            held = []
            for _ in range(limit):  # each serves a request, so the server has surely counted it
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(REQUEST)
                assert (await _response(r)).startswith(b"HTTP/1.1 200 ")
                held.append((r, w))
            for _ in range(3):  # one too many: closed at once, whatever it sends
                r, w = await asyncio.open_connection("127.0.0.1", port)
                t0 = time.monotonic()
                took, got = await _closed_after(r, t0)
                assert got == b"" and took < 1.0, (took, got)
                w.close()
            _, w = held.pop()
            w.close()
            await w.wait_closed()
            # One closed: a new connection gets in again (once the server has seen the close).
            deadline = time.monotonic() + 5
            while not (await _request(port))[1].startswith(b"HTTP/1.1 200 "):
                assert time.monotonic() < deadline, "no connection accepted after one closed"
                await asyncio.sleep(0.05)
            for _, w in held:
                w.close()

        asyncio.run(run())
        assert _dropped(admin, entry, "max_connections") == 3


# -- one server in this process: the entries' own (EntryServer), and aiohttp's -----------
# (BoundedServer), which serves the connections that upgrade


async def _hello(request: web.BaseRequest) -> web.Response:
    return web.Response(text="hi")


async def _bounded(limits: EntryLimits, kind: str, ssl_context: ssl.SSLContext | None = None
                   ) -> tuple[dict[str, int], asyncio.AbstractServer, int]:
    """A server of `kind` on a free port: (its drop counts, the listener, the port)."""
    if kind == "entry":
        entry = EntryServer(_hello, limits=limits, max_header_bytes=8192)
        await entry.listen("127.0.0.1", 0, ssl_context=ssl_context, handshake_timeout=5.0)
        return entry.upgrades.dropped, entry.listening[0], entry.port
    bounded = BoundedServer(_hello, limits=limits, access_log=None)
    server = await asyncio.get_running_loop().create_server(bounded, "127.0.0.1", 0, ssl=ssl_context)
    return bounded.dropped, server, server.sockets[0].getsockname()[1]


SERVERS = pytest.mark.parametrize("kind", ["entry", "aiohttp"])


async def _answered(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A keep-alive connection that has had one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    assert (await _response(reader)).startswith(b"HTTP/1.1 200 ")
    return reader, writer


@SERVERS
def test_keepalive_shorter_than_header_timeout_each_rules_its_wait(kind):
    """The two timeouts share aiohttp's one timer, armed for the nearer: with keepalive_timeout
    the shorter, a new silent connection still has header_timeout, an idle one keepalive_timeout,
    and a head begun after a response header_timeout from its first byte."""
    header, keepalive = 1.2, 0.4

    async def run() -> None:
        dropped, server, port = await _bounded(EntryLimits(header, keepalive, 100), kind)
        try:
            silent = asyncio.ensure_future(_silent(port))
            idle_r, idle_w = await _answered(port)
            slow_r, slow_w = await _answered(port)
            slow_w.write(b"GET /hel")
            t0 = time.monotonic()
            took, got = await _closed_after(idle_r, t0)
            assert got == b"" and keepalive - 0.1 < took < keepalive + 0.5, took
            took, got = await _closed_after(slow_r, t0)
            assert got.startswith(b"HTTP/1.1 408 ") and header - 0.1 < took < header + 0.5, (took, got)
            took, got = await silent
            assert got == b"" and header - 0.1 < took < header + 0.5, took
            assert dropped == {"max_connections": 0, "header_timeout": 2}  # idle ones are not counted
            for w in (idle_w, slow_w):
                w.close()
        finally:
            server.close()

    asyncio.run(run())


@SERVERS
def test_a_head_that_comes_whole_costs_no_timer_call(kind):
    """Requests whose heads arrive in one read (most do) neither arm nor re-arm a timer."""

    async def run() -> int:
        loop = asyncio.get_running_loop()
        armed = []
        call_at = loop.call_at

        def counting(when, callback, *args, **kw):  # type: ignore[no-untyped-def]
            if isinstance(getattr(callback, "__self__", None), (web.RequestHandler, EntryConnection)):
                armed.append(callback)
            return call_at(when, callback, *args, **kw)

        _counts, server, port = await _bounded(EntryLimits(30.0, 60.0, 100), kind)
        try:
            reader, writer = await _answered(port)
            loop.call_at = counting  # type: ignore[method-assign]
            for _ in range(20):
                writer.write(REQUEST)
                assert (await _response(reader)).startswith(b"HTTP/1.1 200 ")
            writer.close()
        finally:
            loop.call_at = call_at  # type: ignore[method-assign]
            server.close()
        return len(armed)

    assert asyncio.run(run()) == 0


@SERVERS
def test_a_dribbler_that_writes_on_still_reads_its_408(kind):
    """A caller that goes on sending after header_timeout gets its 408 all the same: the
    entry closes by lingering (408, FIN, the rest read away), not at once, which would
    answer those bytes with a RST that discards the 408 unread (one in two, before)."""

    async def dribble(port: int) -> bytes | str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        answer = asyncio.ensure_future(reader.read())
        while not answer.done():
            writer.write(b"a")
            await asyncio.wait([answer], timeout=0.002)
        writer.close()
        try:
            return answer.result()
        except ConnectionResetError:
            return "reset"

    async def run() -> list[bytes | str]:
        _counts, server, port = await _bounded(EntryLimits(header_timeout=0.3), kind)
        try:
            return await asyncio.gather(*(dribble(port) for _ in range(100)))
        finally:
            server.close()

    answers = asyncio.run(run())
    assert all(isinstance(a, bytes) and a.startswith(b"HTTP/1.1 408 ") for a in answers), \
        {a if isinstance(a, str) else a[:20] for a in answers}


@SERVERS
def test_a_slow_head_over_tls_gets_its_408_too(tmp_path, kind):
    """TLS cannot half-close: the lingering 408 closes after the linger instead (no error)."""
    server_ctx, client_ctx = self_signed_tls(tmp_path)

    async def run() -> bytes:
        _counts, server, port = await _bounded(EntryLimits(header_timeout=0.3), kind, server_ctx)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            got = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return got
        finally:
            server.close()

    assert asyncio.run(run()).startswith(b"HTTP/1.1 408 ")
