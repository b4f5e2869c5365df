"""Abuse: a tunnel client that answers with forged response heads (issue 17,
item 2). A fake client built from the project's own frames joins group "raw"
and answers each request by its path: a Content-Length shorter than the body
with a second, forged response after it, Content-Length and Transfer-Encoding
together, statuses 0, 999, 100, 102 and 101 to a request that did not ask to
upgrade, CR/LF/NUL in a value or the reason, bad header names. Whatever it
sends, the caller gets a 502 `bad_response` or a cut connection, nothing
forged reaches it, the gateway logs a line naming the client, and the
caller's next request, for group g1, on a new connection, is answered
normally. The same forged heads through the WebSocket bridge and the gRPC
entry."""
from __future__ import annotations

import asyncio
import http.client as httpc
import io
import json
import socket
import threading
from typing import Any, Callable

import grpc
import grpc.aio
import pytest

from gateway.tunnel import frames
from tests.harness import Stack, http, wait_until
from tests.test_bad_input import RAW_TOKEN, RawTunnel

FORGED_RESPONSE = b"HTTP/1.1 200 OK\r\nX-Injected: yes\r\nContent-Length: 6\r\n\r\nPWNED!"
MARKERS = (b"x-injected", b"pwned")

Build = Callable[[str, str], list[list[frames.Frame]]]  # (request_id, trace_id) -> batches to send


def _head(status: int, headers: list[tuple[str, str]], *, end: bool = False, reason: str = "") -> Callable:
    return lambda rid, tid: frames.response_head(rid, tid, status=status, reason=reason, headers=headers,
                                                 end_stream=end, fields=True)


def _data(chunk: bytes, *, end: bool) -> Callable:
    return lambda rid, tid: frames.data(rid, tid, chunk, end_stream=end, reply=True)


def _answer(*batches: list[Callable]) -> Build:
    return lambda rid, tid: [[make(rid, tid) for make in batch] for batch in batches]


def _bad_head(status: int, headers: list[tuple[str, str]], reason: str = "") -> Build:
    return _answer([_head(status, headers, reason=reason), _data(b"body", end=True)])


TEXT = [("Content-Type", "text/plain")]

# Every way the fake client answers; the HTTP ones by path /forged/NAME.
BAD = {
    # A body longer than its Content-Length, the rest a second response: in one batch with
    # the head (the entry has the whole body at once), and streamed after it.
    "cl-shorter-than-body": _answer([_head(200, [*TEXT, ("Content-Length", "5")]),
                                     _data(b"hello" + FORGED_RESPONSE, end=True)]),
    "cl-shorter-streamed": _answer([_head(200, [*TEXT, ("Content-Length", "5")]), _data(b"hel", end=False)],
                                   [_data(b"lo" + FORGED_RESPONSE, end=True)]),
    "cl-longer-than-body": _answer([_head(200, [*TEXT, ("Content-Length", "50")]), _data(b"short", end=True)]),
    "cl-and-te": _bad_head(200, [("Content-Length", "5"), ("Transfer-Encoding", "chunked")]),
    "cl-differ": _bad_head(200, [("Content-Length", "4"), ("Content-Length", "40")]),
    "status-0": _bad_head(0, TEXT),
    "status-999": _bad_head(999, TEXT),
    "status-100": _bad_head(100, TEXT),
    "status-101": _bad_head(101, [("Upgrade", "websocket"), ("Connection", "Upgrade")]),
    "status-102": _bad_head(102, TEXT),
    "cr-in-value": _bad_head(200, [("X-A", "1\rX-Injected: yes")]),
    "lf-in-value": _bad_head(200, [("X-A", "1\nX-Injected: yes")]),
    "crlf-split-in-value": _bad_head(200, [("X-A", "1\r\nContent-Length: 0\r\n\r\n" + FORGED_RESPONSE.decode())]),
    "nul-in-value": _bad_head(200, [("X-A", "1\x00X-Injected")]),
    "bad-name": _bad_head(200, [("X Injected", "yes")]),
    "crlf-in-name": _bad_head(200, [("X-A\r\nX-Injected", "yes")]),
    "crlf-in-reason": _bad_head(200, TEXT, reason="OK\r\nX-Injected: yes"),
}

# The body's length is wrong, not the head: a cut connection (or a 502 if the body came with the head).
CUT = {"cl-shorter-than-body", "cl-shorter-streamed", "cl-longer-than-body"}

GOOD = {
    # Hop-by-hop headers of the client's head are dropped; the body is framed by the gateway.
    "hop-by-hop": _answer([_head(200, [("Connection", "close, X-Secret"), ("X-Secret", "s"), ("Keep-Alive", "t=1"),
                                       ("Transfer-Encoding", "chunked"), ("Proxy-Authenticate", "Basic"),
                                       ("Upgrade", "h2c"), ("Trailer", "X-T"), ("Set-Cookie", "a=1"),
                                       ("X-Kept", "yes"), ("set-cookie", "b=2")]),
                           _data(b"4\r\nbody\r\n0\r\n\r\n", end=True)]),
    # A 103 Early Hints is dropped; the final head follows.
    "early-hints": _answer([_head(103, [("Link", "</a.css>; rel=preload")])],
                           [_head(200, [*TEXT, ("Content-Length", "5")]), _data(b"final", end=True)]),
}


class Forger:
    """The fake tunnel client "forger" of group raw, on a loop of its own thread."""

    def __init__(self, port: int) -> None:
        self.resets: list[tuple[str, str]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="forger", daemon=True)
        self.thread.start()
        self.tunnel: RawTunnel | None = None
        self.run = asyncio.run_coroutine_threadsafe(self._run(port), self.loop)

    async def _run(self, port: int) -> None:
        self.tunnel = t = RawTunnel(port)
        welcome = await t.hello("forger", capabilities=("http", frames.HEADER_FIELDS))
        assert welcome.accepted, welcome
        while (batch := await t.read(timeout=3600)) is not None:
            for f in batch:
                kind = f.WhichOneof("kind")
                if kind == "reset":
                    self.resets.append((f.request_id, f.reset.code))
                elif kind == "headers" and not f.reply:
                    name = f.headers.path.rsplit("/", 1)[-1].split("?")[0]
                    build = BAD.get(name) or GOOD.get(name) or GRPC_BAD.get(name)
                    if build is None:
                        await t.send_frames(frames.reset(f.request_id, f.trace_id, "no_matching_rule", name,
                                                         reply=True))
                        continue
                    for frame_batch in build(f.request_id, f.trace_id):
                        await t.send_frames(*frame_batch)

    def reset_codes(self) -> list[str]:
        return [code for _rid, code in self.resets]

    def close(self) -> None:
        if self.tunnel is not None:
            asyncio.run_coroutine_threadsafe(self.tunnel.close(), self.loop).result(10)
        self.run.cancel()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _with_raw(stack: Stack, doc: dict) -> None:
    doc["groups"]["raw"] = {"tokens": [RAW_TOKEN], "upstreams": {"web": {"servers": [stack.backend_url]}},
                            "rules": [{"path_prefix": "/", "upstream": "web"}]}
    doc["routes"] = [{"path_prefix": "/forged", "group": "raw", "timeout": 10.0}, *doc["routes"]]
    doc["grpc_routes"] = [{"match_service": "forged.", "group": "raw", "timeout": 10.0}]


@pytest.fixture(scope="module")
def forged(make_module_stack):
    stack = make_module_stack(settings={"workers": 1}, edit=_with_raw)
    forger = Forger(stack.tunnel_port)
    try:
        wait_until(lambda: stack.streams("raw") == 1 and stack.routable(), what="forger's stream",
                   watch=stack.gateway)
        yield stack, forger
    finally:
        forger.close()


class _Recorder(io.RawIOBase):
    """A socket's reads, each byte kept in `seen`."""

    def __init__(self, sock: socket.socket, seen: bytearray) -> None:
        self.sock = sock
        self.seen = seen

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.sock.recv_into(b)
        self.seen += bytes(b[:n])
        return n


class _RecordingSocket:
    def __init__(self, sock: socket.socket, seen: bytearray) -> None:
        self._sock = sock
        self._seen = seen

    def makefile(self, mode: str, *args: Any, **kw: Any) -> io.BufferedReader:
        return io.BufferedReader(_Recorder(self._sock, self._seen))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class RecordingConnection(httpc.HTTPConnection):
    """http.client's parsing, with every byte the gateway wrote on the connection in `seen`."""

    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port, timeout=20)
        self.seen = bytearray()

    def connect(self) -> None:
        super().connect()
        self.sock = _RecordingSocket(self.sock, self.seen)


def _one(conn: RecordingConnection, target: str, host: str) -> tuple[int, dict, bytes] | Exception:
    try:
        conn.request("GET", target, headers={"Host": host})
        conn.auto_open = 0  # a second request must go on this connection or nowhere
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    except (httpc.HTTPException, OSError) as exc:
        return exc


def _forged_then_next(port: int, name: str) -> tuple[Any, Any, bytes]:
    """/forged/NAME, then /hello (group g1) on the same keep-alive connection."""
    conn = RecordingConnection(port)
    try:
        first = _one(conn, f"/forged/{name}", "forged.test")
        second = _one(conn, "/hello", "next.test")
        return first, second, bytes(conn.seen)
    finally:
        conn.close()


def _is_bad_response(answer: Any) -> bool:
    if isinstance(answer, Exception):
        return False
    status, headers, body = answer
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return status == 502 and error == "bad_response" and bool(headers.get("x-request-id"))


@pytest.mark.parametrize("name", list(BAD))
def test_a_forged_head_never_reaches_the_caller(forged, name):
    stack, forger = forged
    first, second, seen = _forged_then_next(stack.http_port, name)
    for marker in MARKERS:
        assert marker not in seen.lower(), (name, seen)
    if name in CUT and not _is_bad_response(first):
        # The head had gone out: the body is cut at its declared length and the connection closed.
        if not isinstance(first, Exception):
            status, _headers, body = first
            assert status == 200 and body == b"hello", first
        assert isinstance(second, Exception), second
    else:
        assert _is_bad_response(first), (name, first)
        # The client is told to stop (RESET bad_response).
        rid = first[1]["x-request-id"]
        wait_until(lambda: (rid, "bad_response") in forger.resets, what="RESET bad_response to the forger")
        # The connection stays usable: the next request is answered by g1, not by anything forged.
        assert not isinstance(second, Exception), second
        assert second[0] == 200 and second[1].get("x-request-id"), second
    # The next request for another group, on a new connection, is answered normally.
    assert http("GET", f"{stack.url}/hello", headers={"Host": "next.test"}).status == 200
    # The gateway's log names the client.
    wait_until(lambda: "bad response from tunnel client forger (group raw)" in stack.gateway.output(),
               what="log line naming the client", watch=stack.gateway)


@pytest.mark.parametrize("name", list(GOOD))
def test_a_good_head_from_the_same_client_is_relayed_re_framed(forged, name):
    stack, _ = forged
    first, second, seen = _forged_then_next(stack.http_port, name)
    assert not isinstance(first, Exception) and first[0] == 200, first
    status, headers, body = first
    if name == "hop-by-hop":
        for gone in ("x-secret", "keep-alive", "proxy-authenticate", "upgrade", "trailer"):
            assert gone not in headers, headers
        # The client's Transfer-Encoding is not applied: the gateway frames the bytes it got.
        assert headers["x-kept"] == "yes" and body == b"4\r\nbody\r\n0\r\n\r\n"
        assert seen.lower().count(b"set-cookie: ") == 2
    else:
        assert body == b"final" and headers["content-length"] == "5"
    assert not isinstance(second, Exception) and second[0] == 200, second


def _upgrade(port: int, name: str) -> bytes:
    """A WebSocket handshake to /forged/NAME; every byte of the answer until the gateway closes or
    the head of its answer is complete."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall((f"GET /forged/{name} HTTP/1.1\r\nHost: forged.test\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


@pytest.mark.parametrize("name", ["crlf-split-in-value", "nul-in-value", "bad-name", "status-999", "status-102"])
def test_a_forged_head_to_a_websocket_upgrade_is_a_502(forged, name):
    stack, _ = forged
    got = _upgrade(stack.http_port, name)
    assert got.startswith(b"HTTP/1.1 502 "), got
    assert b"bad_response" in got or b"content-length" in got.lower()
    for marker in MARKERS:
        assert marker not in got.lower(), got


GRPC_BAD = {
    "grpc-status-0": _answer([_head(0, [])]),
    "grpc-crlf-metadata": _answer([_head(200, [("x-a", "1\r\nx-injected: yes")])]),
    "grpc-bad-key": _answer([_head(200, [("X Injected", "yes")])]),
    "grpc-bad-bin": _answer([_head(200, [("x-a-bin", "not base64!!!=")])]),
    "grpc-101": _answer([_head(101, [("Upgrade", "h2c")])]),
}


@pytest.mark.parametrize("name", list(GRPC_BAD))
def test_a_forged_head_to_a_grpc_call_is_unavailable_bad_response(forged, name):
    stack, forger = forged

    async def call() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary(f"/forged.Svc/{name}")(b"", timeout=15)
            return err.value

    err = asyncio.run(call())
    assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details().startswith("bad_response"), err
    md = {k: v for k, v in (err.initial_metadata() or ())}
    assert "x-injected" not in md and "x injected" not in md
    assert http("GET", f"{stack.url}/hello").status == 200


def test_a_forged_head_through_another_worker_names_the_client_not_the_channel(make_stack):
    """With two workers, a caller on the worker without the forger's stream reaches it through the
    router: the log line still names the client, never the channel between workers."""
    stack = make_stack(settings={"workers": 2}, edit=_with_raw)
    forger = Forger(stack.tunnel_port)
    try:
        wait_until(lambda: stack.streams("raw") == 1 and stack.routable(), what="forger's stream",
                   watch=stack.gateway)
        # New connections land on either worker; enough of them make both serve some.
        for _ in range(16):
            assert _is_bad_response(_one(RecordingConnection(stack.http_port), "/forged/status-999", "forged.test"))
        lines = [json.loads(line) for line in stack.gateway.output().splitlines()
                 if line.startswith("{") and "bad response from tunnel client" in line]
        assert len({line.get("worker") for line in lines}) == 2, lines
        assert {line["client_id"] for line in lines} == {"forger"}, lines
    finally:
        forger.close()
