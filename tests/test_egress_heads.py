"""Abuse: a tunnel client that sends forged request heads up its tunnel (egress), to
smuggle requests to the gateway's backends. A fake client built from the project's own
frames joins group "raw" and sends, each on its own tunnel: CR LF in a header value, NUL
in one, a method that carries a whole second request line, a method with a space,
Transfer-Encoding: chunked with a Content-Length, two Content-Lengths, a body longer than
its Content-Length (in one DATA frame and streamed), a body shorter than it, a length on
a head with no body. The gateway's forward rule sends egress to a real aiohttp backend in
this process that records every request it parses. Whatever the client sends, it gets a
RESET bad_request (400) or, for a body past its length, the answer to the declared part
only; the backend never sees a second request, an injected or hop-by-hop header; the
gateway logs a line naming the client and the request id; and the client's next good
request on the same tunnel is served (on a clean upstream connection)."""
from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from gateway.tunnel import frames
from tests.harness import Stack, free_port, wait_until
from tests.test_bad_input import RAW_TOKEN, RawTunnel

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\nX-Injected: yes\r\n\r\n"
# What the backend must never see, in a name or a path.
FORBIDDEN_NAMES = {"x-injected", "keep-alive", "te", "trailer", "upgrade", "proxy-connection", "x-secret"}


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    connection: int  # the backend's own number of the upstream connection


class Recorder:
    """A real aiohttp backend on a loop of its own thread: every request it parses, recorded."""

    def __init__(self) -> None:
        self.port = free_port()
        self.seen: list[Seen] = []
        self._connections: dict[int, int] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="recorder", daemon=True)
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        return runner

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        conn = self._connections.setdefault(id(request.transport), len(self._connections) + 1)
        self.seen.append(Seen(request.method, request.path_qs,
                              [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.raw_headers],
                              body, conn))
        return web.Response(text=f"{request.method} {request.path_qs} {len(body)}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def egress(make_module_stack):
    recorder = Recorder()

    def edit(stack: Stack, doc: dict) -> None:
        doc["groups"]["raw"] = {"tokens": [RAW_TOKEN], "upstreams": {"web": {"servers": [stack.backend_url]}},
                                "rules": [{"path_prefix": "/", "upstream": "web"}]}
        doc["upstreams"] = {"backend": {"servers": [recorder.url]}}  # the forward rule's upstream

    try:
        yield make_module_stack(settings={"workers": 1}, edit=edit, client=None), recorder
    finally:
        recorder.close()


@dataclass
class Reply:
    status: int = 0
    body: bytes = b""
    reset: str = ""
    frames: list = field(default_factory=list)


def _head(rid: str, method: str, path: str, headers: list[tuple[str, str]], *, end: bool) -> frames.Frame:
    return frames.request_head(rid, f"trace-{rid}", method=method, path=path, scheme="http", authority="127.0.0.1",
                               headers=[("Host", "127.0.0.1"), *headers], end_stream=end, timeout_ms=8000)


def _data(rid: str, chunk: bytes, *, end: bool) -> frames.Frame:
    return frames.data(rid, f"trace-{rid}", chunk, end_stream=end, reply=False)


async def _reply(t: RawTunnel, rid: str, timeout: float = 8.0) -> Reply:
    """The gateway's answer to request `rid`: until its body ends or a RESET."""
    out = Reply()
    while True:
        batch = await t.read(timeout)
        assert batch is not None, "the gateway ended the tunnel"
        for f in batch:
            if f.request_id != rid:
                continue
            out.frames.append(f)
            kind = f.WhichOneof("kind")
            if kind == "reset":
                out.reset = f.reset.code
                return out
            if kind == "headers":
                out.status = f.headers.status
                if f.headers.end_stream:
                    return out
            elif kind == "data":
                out.body += f.data.data
                if f.data.end_stream:
                    return out


# Each case: the batches of frames the fake client sends for request "bad" (a pause between batches).
CASES = {
    "crlf-in-value": [[_head("bad", "GET", "/crlf", [("X-A", "1\r\nX-Injected: yes")], end=True)]],
    "crlf-request-in-value": [[_head("bad", "GET", "/crlf2", [("X-A", "1\r\n\r\n" + SMUGGLED.decode())], end=True)]],
    "nul-in-value": [[_head("bad", "GET", "/nul", [("X-A", "a\x00b")], end=True)]],
    "request-line-in-method": [[_head("bad", SMUGGLED.decode() + "GET", "/method", [], end=True)]],
    "space-in-method": [[_head("bad", "GET /smuggled", "/method2", [], end=True)]],
    "te-and-cl": [[_head("bad", "POST", "/te-cl", [("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
                         end=False),
                   _data("bad", b"0\r\n\r\n" + SMUGGLED, end=True)]],
    "two-content-lengths": [[_head("bad", "POST", "/two-cl", [("Content-Length", "5"), ("Content-Length", "47")],
                                   end=False),
                             _data("bad", b"hello" + SMUGGLED[:42], end=True)]],
    "body-past-length": [[_head("bad", "POST", "/long", [("Content-Length", "5")], end=False),
                          _data("bad", b"hello" + SMUGGLED, end=True)]],
    "body-past-length-streamed": [[_head("bad", "POST", "/long2", [("Content-Length", "5")], end=False),
                                   _data("bad", b"hel", end=False)],
                                  [_data("bad", b"lo" + SMUGGLED, end=True)]],
    "body-short-of-length": [[_head("bad", "POST", "/short", [("Content-Length", "10")], end=False),
                              _data("bad", b"hello", end=True)]],
    "length-without-body": [[_head("bad", "POST", "/nobody", [("Content-Length", "5")], end=True)]],
}

# A body past its length may be answered, for the declared part only; the rest are refused.
PAST = {"body-past-length", "body-past-length-streamed"}


def _run(stack: Stack, client_id: str, batches: list[list[frames.Frame]]) -> tuple[Reply, Reply]:
    """On a new tunnel of the fake client: the forged request, then a good one."""

    async def main() -> tuple[Reply, Reply]:
        t = RawTunnel(stack.tunnel_port)
        try:
            assert (await t.hello(client_id)).accepted
            for i, batch in enumerate(batches):
                if i:
                    await asyncio.sleep(0.2)  # the upstream has the head and the first part by now
                await t.send_frames(*batch)
            bad = await _reply(t, "bad")
            await t.send_frames(_head("good", "POST", f"/good?after={client_id}", [("Content-Length", "4")],
                                      end=False), _data("good", b"next", end=True))
            return bad, await _reply(t, "good")
        finally:
            await t.close()

    return asyncio.run(main())


def _assert_clean(seen_now: list[Seen]) -> None:
    for seen in seen_now:
        assert "smuggled" not in seen.path and seen.method in ("GET", "POST"), seen
        names = {n.lower() for n, _ in seen.headers}
        assert not names & FORBIDDEN_NAMES, seen
        assert sum(n == "content-length" for n in (x.lower() for x, _ in seen.headers)) <= 1, seen
        assert not ({"transfer-encoding", "content-length"} <= names), seen
        assert b"smuggled" not in seen.body.lower() and b"injected" not in seen.body.lower(), seen


@pytest.mark.parametrize("name", list(CASES))
def test_a_forged_egress_head_never_reaches_the_backend(egress, name):
    stack, recorder = egress
    before = len(recorder.seen)
    client_id = f"eg-{name}"
    bad, good = _run(stack, client_id, CASES[name])
    if name in PAST and bad.status:
        # The upstream had the declared request whole; nothing after it.
        assert bad.status == 200 and bad.body.endswith(b" 5"), bad
    else:
        assert bad.reset == "bad_request" and not bad.status, bad
    # The next good request from the same client is served, by its own answer (no
    # response to anything smuggled before it).
    assert good.status == 200 and good.body == f"POST /good?after={client_id} 4".encode(), good
    new = recorder.seen[before:]
    _assert_clean(new)
    assert new[-1].path == f"/good?after={client_id}" and new[-1].body == b"next", new
    # Nothing but the declared part of the forged request, and the good one.
    assert len(new) <= 2, new
    if len(new) == 2:
        assert name in PAST and new[0].body == b"hello", new
        # The connection that carried a body past its length was closed, not pooled.
        assert new[1].connection != new[0].connection, new
    if not bad.status:
        wait_until(lambda: _logged(stack, client_id), what="log line naming the client", watch=stack.gateway)
    stack.wait_idle()


def _logged(stack: Stack, client_id: str) -> bool:
    """The gateway logged the refusal: naming the client, its group and the request id."""
    for line in stack.gateway.output().splitlines():
        if line.startswith("{") and f"from peer {client_id} (group raw)" in line:
            entry = json.loads(line)
            return entry["request_id"] == "bad" and entry["client_id"] == client_id and entry["code"] == "bad_request"
    return False


def test_hop_by_hop_egress_headers_are_dropped_and_the_body_framed_by_the_gateway(egress):
    stack, recorder = egress
    before = len(recorder.seen)
    sent = [("Connection", "keep-alive, X-Secret"), ("X-Secret", "s"), ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"), ("TE", "trailers"), ("Trailer", "X-T"), ("Upgrade", "h2c"),
            ("Proxy-Connection", "keep-alive"), ("X-Kept", "yes")]
    bad, good = _run(stack, "eg-hop", [[_head("bad", "POST", "/hop", sent, end=False),
                                        _data("bad", b"hello", end=True)]])
    assert bad.status == 200 and bad.body == b"POST /hop 5", bad
    assert good.status == 200, good
    hop = recorder.seen[before]
    assert hop.path == "/hop" and hop.body == b"hello", hop
    assert ("X-Kept", "yes") in hop.headers, hop
    # One Transfer-Encoding: the gateway's own, for the body it framed.
    assert [v for n, v in hop.headers if n.lower() == "transfer-encoding"] == ["chunked"], hop
    _assert_clean(recorder.seen[before:])
