"""The serving side's HTTP client against real sockets: a scripted upstream
that answers with exactly the bytes a test gives it, well-formed or not."""
from __future__ import annotations

import asyncio
import hashlib
from typing import Awaitable, Callable

import pytest

from gateway.http.upstream_pool import HttpPool, UpstreamError, UpstreamTimeout

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def run(script: Script, body: Callable[[HttpPool, str], Awaitable[object]]) -> object:
    """Serve `script` on a free loopback port and run `body(pool, url)` against it."""

    async def main() -> object:
        connections: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(1)
            try:
                await script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = HttpPool(connect_timeout=2)
        try:
            result = await asyncio.wait_for(body(pool, f"http://127.0.0.1:{port}"), 20)
        finally:
            await pool.close()
            server.close()
        return result, len(connections)

    return asyncio.run(main())


async def _read_all(resp) -> bytes:
    out = []
    try:
        while (chunk := await resp.read()) is not None:
            out.append(chunk)
    finally:
        resp.release()
    return b"".join(out)


def answer(raw: bytes, *, until_hangup: bool = False) -> Script:
    """Read one request head, answer with exactly `raw`; then close, or wait for the client to hang up."""
    async def script(reader, writer) -> None:
        await _read_head(reader)
        writer.write(raw)
        await writer.drain()
        if until_hangup:
            await reader.read()
    return script


def keep_alive_answers(n: int, payload: bytes = b"hello") -> Script:
    async def script(reader, writer) -> None:
        for _ in range(n):
            await _read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-A: 1\r\nX-A: 2\r\n\r\n%s" % (len(payload), payload))
            await writer.drain()
    return script


def test_keep_alive_connection_is_reused_and_headers_keep_order_and_repeats():
    async def body(pool, url):
        seen = []
        for _ in range(3):
            resp = await pool.request(url, "GET", "/x?q=1", [("X-Test", "1")], None, read_timeout=5)
            seen.append((resp.status, resp.reason, resp.raw_headers, await _read_all(resp)))
        return seen

    seen, connections = run(keep_alive_answers(3), body)
    assert connections == 1
    for status, reason, headers, data in seen:
        assert (status, reason, data) == (200, "OK", b"hello")
        assert [(n, v) for n, v in headers if n == b"X-A"] == [(b"X-A", b"1"), (b"X-A", b"2")]


def test_chunked_upload_and_chunked_response():
    async def script(reader, writer):
        head = await _read_head(reader)
        assert b"transfer-encoding: chunked" in head.lower()
        received = hashlib.sha256()
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            received.update(chunk[:-2])
        digest = received.hexdigest().encode()
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (digest[:10], digest[10:]):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    parts = [b"a" * 70000, b"b" * 3, b"c" * 100000]

    async def gen():
        for p in parts:
            yield p

    async def body(pool, url):
        resp = await pool.request(url, "POST", "/sink", [], gen(), read_timeout=5)
        return await _read_all(resp)

    data, _ = run(script, body)
    assert data == hashlib.sha256(b"".join(parts)).hexdigest().encode()


def test_body_delimited_by_the_end_of_the_connection():
    script = answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")

    async def body(pool, url):
        return await _read_all(await pool.request(url, "GET", "/", [], None, read_timeout=5))

    assert run(script, body)[0] == b"until the end"


def test_interim_100_continue_is_skipped():
    script = answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")

    async def body(pool, url):
        resp = await pool.request(url, "GET", "/", [], None, read_timeout=5)
        return resp.status, await _read_all(resp)

    assert run(script, body)[0] == (201, b"ok")


def test_head_response_has_no_body_even_with_a_length():
    # The client closes at the end: a HEAD's connection is not reused.
    script = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", until_hangup=True)

    async def body(pool, url):
        resp = await pool.request(url, "HEAD", "/", [], None, read_timeout=5)
        return resp.status, await _read_all(resp)

    assert run(script, body)[0] == (200, b"")


@pytest.mark.parametrize("raw", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n",
])
def test_malformed_response_is_a_clear_error(raw):
    script = answer(raw, until_hangup=True)

    async def body(pool, url):
        with pytest.raises(UpstreamError, match="invalid response"):
            await pool.request(url, "GET", "/", [], None, read_timeout=5)
        return True

    assert run(script, body)[0] is True


def test_upstream_closing_mid_body_is_an_error_not_a_short_body():
    script = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")

    async def body(pool, url):
        resp = await pool.request(url, "GET", "/", [], None, read_timeout=5)
        with pytest.raises(UpstreamError, match="closed"):
            await _read_all(resp)
        return True

    assert run(script, body)[0] is True


def test_silent_upstream_times_out():
    async def script(reader, writer):
        await _read_head(reader)
        await asyncio.sleep(10)

    async def body(pool, url):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamError, match="nothing received"):
            await pool.request(url, "GET", "/", [], None, read_timeout=0.3)
        return loop.time() - started

    elapsed = run(script, body)[0]
    assert 0.25 < elapsed < 3


def test_refused_connection_is_an_upstream_error():
    async def body(pool, url):
        with pytest.raises(UpstreamError, match="connect failed"):
            await pool.request("http://127.0.0.1:1", "GET", "/", [], None, read_timeout=5)
        return True

    assert run(keep_alive_answers(0), body)[0] is True


def test_a_kept_alive_connection_the_server_closed_is_retried_once_for_a_bodiless_request():
    served = []

    async def script(reader, writer):
        served.append(1)
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        await writer.drain()
        if len(served) == 1:
            # Keep-alive was promised, but the next request on this connection
            # is dropped unanswered, as a server timing the connection out does.
            await _read_head(reader)

    async def body(pool, url):
        first = await _read_all(await pool.request(url, "GET", "/", [], None, read_timeout=5))
        second = await _read_all(await pool.request(url, "GET", "/", [], None, read_timeout=5))
        return first, second

    (first, second), connections = run(script, body)
    assert (first, second) == (b"first", b"first")
    assert connections == 2


def test_header_with_a_line_break_is_refused_before_anything_is_sent():
    async def body(pool, url):
        with pytest.raises(ValueError):
            await pool.request(url, "GET", "/", [("X-Evil", "a\r\nInjected: 1")], None, read_timeout=5)
        return True

    assert run(keep_alive_answers(0), body)[0] is True


def test_abandoned_response_closes_the_connection_so_the_upstream_sees_it():
    hung_up = []

    async def script(reader, writer):
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        hung_up.append(await reader.read() == b"")  # EOF: the client hung up

    async def body(pool, url):
        resp = await pool.request(url, "GET", "/", [], None, read_timeout=5)
        await resp.read()
        resp.release()
        return True

    assert run(script, body) == (True, 1)
    assert hung_up == [True]


def test_head_timeout_is_a_timeout_and_is_not_retried():
    async def script(reader, writer):
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await _read_head(reader)
        await asyncio.sleep(10)  # the second request gets no answer

    async def body(pool, url):
        loop = asyncio.get_running_loop()
        # The first request leaves a kept-alive connection: a retry of the
        # second on a fresh one would be possible if timeouts were retried.
        assert await _read_all(await pool.request(url, "GET", "/", [], None, read_timeout=5)) == b"ok"
        started = loop.time()
        with pytest.raises(UpstreamTimeout, match="no response head within 0.3s"):
            await pool.request(url, "GET", "/", [], None, read_timeout=5, head_timeout=0.3)
        return loop.time() - started

    elapsed, connections = run(script, body)
    assert 0.25 < elapsed < 3 and connections == 1
