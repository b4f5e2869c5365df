"""Bad input on every door: garbage on the tunnel port, frames for requests
that do not exist, wrong tokens and groups, oversize heads (431) and bodies
(413). The gateway answers or drops the offender and keeps serving the rest."""
from __future__ import annotations

import asyncio
import json

import grpc
import grpc.aio
import pytest

from gateway.tunnel import frames
from tests.harness import Stack, get_json, http, raw_request, wait_heartbeats, wait_until

CONNECT = "/tunnel.v1.Tunnel/Connect"
RAW_TOKEN = "raw-group-token"

GARBAGE = [
    b"\xff\xff\xff\xff\xff",           # a tag that never ends
    b"\x0a\x10short",                  # a frame longer than the message
    b"\x0a\x03\x0a\x01\xff",           # a request id that is not UTF-8
    b"\x0b\x0a\x00",                   # a group wire type where a frame should be
]


def _raw_group(stack: Stack, doc: dict) -> None:
    """Group "raw", for the hand-made connections of these tests."""
    doc["groups"]["raw"] = {"tokens": [RAW_TOKEN], "upstreams": {"web": {"servers": [stack.backend_url]}},
                            "rules": [{"path_prefix": "/", "upstream": "web"}]}


# g1 with client c1, group "raw", small limits for heads and bodies.
LIMITED = {"settings": {"workers": 1, "max_header_bytes": 4096, "max_body_bytes": 256 * 1024}, "edit": _raw_group,
           "client_extra": ["--max-header-bytes", "4096", "--max-body-bytes", str(256 * 1024)]}


@pytest.fixture
def stack(make_stack) -> Stack:
    """A fresh stack: the tunnel tests count log lines and streams."""
    return make_stack(**LIMITED)


@pytest.fixture(scope="module")
def shared(make_module_stack) -> Stack:
    """One stack for the 431/413 tests: each request stands alone."""
    return make_module_stack(**LIMITED)


def _still_serving(stack: Stack) -> None:
    assert stack.gateway.alive()
    assert http("GET", f"http://127.0.0.1:{stack.admin_port}/healthz").status == 200
    assert http("GET", f"{stack.url}/hello").status == 200
    assert http("GET", f"{stack.local_url()}/hello").status == 200


class RawTunnel:
    """A hand-driven tunnel connection: raw bytes in, decoded frames out."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.call = self.channel.stream_stream(CONNECT)()

    async def send(self, raw: bytes) -> None:
        await self.call.write(raw)

    async def send_frames(self, *fs: frames.Frame) -> None:
        await self.send(frames.join_batch(frames.encode_frame(f) for f in fs))

    async def read(self, timeout: float = 5.0) -> list[frames.Frame] | None:
        """The next batch (PINGs answered and left out), or None when the gateway ended the call."""
        while True:
            try:
                raw = await asyncio.wait_for(self.call.read(), timeout)
            except grpc.aio.AioRpcError:
                return None
            if raw is grpc.aio.EOF:
                return None
            batch = list(frames.decode_batch(raw))
            for f in batch:
                if f.WhichOneof("kind") == "ping" and not f.ping.ack:
                    await self.send_frames(frames.ping(f.ping.nonce, ack=True, inflight=0))
            batch = [f for f in batch if f.WhichOneof("kind") != "ping"]
            if batch:
                return batch

    async def read_all(self, timeout: float = 5.0) -> list[frames.Frame]:
        """Every frame until the gateway ends the call."""
        out: list[frames.Frame] = []
        while (batch := await self.read(timeout)) is not None:
            out += batch
        return out

    async def hello(self, client_id: str, group: str = "raw", token: str = RAW_TOKEN,
                    capabilities: tuple[str, ...] = ("http",)) -> frames.pb.Welcome:
        await self.send_frames(frames.hello(client_id=client_id, group=group, token=token, version="test",
                                            capabilities=capabilities, connection_index=0))
        first = await self.read()
        assert first and first[0].WhichOneof("kind") == "welcome", first
        return first[0].welcome

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


def _raw_streams(stack: Stack, client_id: str) -> list[dict]:
    return [s for s in stack.status()["streams"] if s["client_id"] == client_id]


# -- malformed protobuf on the tunnel ------------------------------------------------------


def test_garbage_instead_of_hello_is_refused_and_the_gateway_keeps_serving(stack):
    async def main():
        answers = []
        for junk in GARBAGE:
            t = RawTunnel(stack.tunnel_port)
            try:
                await t.send(junk)
                answers.append(await t.read_all())
            finally:
                await t.close()
        return answers

    for answer in asyncio.run(main()):
        # One WELCOME that refuses, then the call ends.
        assert [f.WhichOneof("kind") for f in answer] == ["welcome"]
        assert not answer[0].welcome.accepted and answer[0].welcome.code == "protocol_error"
    wait_until(lambda: stack.gateway.output().count("tunnel rejected") >= len(GARBAGE), 5, what="rejections logged")
    _still_serving(stack)
    stack.wait_idle()


@pytest.mark.parametrize("junk", GARBAGE, ids=["endless-tag", "overrun", "bad-utf8", "wrong-wire-type"])
def test_garbage_on_an_open_stream_closes_only_that_stream(stack, junk):
    async def main():
        t = RawTunnel(stack.tunnel_port)
        try:
            welcome = await t.hello("raw")
            assert welcome.accepted, welcome
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_until(lambda: _raw_streams(stack, "raw"), 5, what="raw stream registered"))
            await t.send(junk)
            return await t.read_all()
        finally:
            await t.close()

    rest = asyncio.run(main())
    # The gateway says why before it hangs up.
    assert [(f.WhichOneof("kind"), f.goaway.reason) for f in rest] == [("goaway", "protocol_error")]
    wait_until(lambda: not _raw_streams(stack, "raw"), 5, what="raw stream dropped")
    assert "closing tunnel" in stack.gateway.output()
    # c1's stream was never touched.
    assert stack.streams("g1") == 2
    _still_serving(stack)
    stack.wait_idle()


# -- frames for request ids that do not exist --------------------------------------------------


def test_frames_for_unknown_request_ids_are_counted_and_ignored(stack):
    unknown = [
        frames.data("nope-1", "t", b"stray body", end_stream=False, reply=False),
        frames.data("nope-2", "t", b"", end_stream=True, reply=False),
        frames.window("nope-3", "t", 65536, reply=False),
        frames.reset("nope-4", "t", "cancelled", "", reply=False),
        frames.data("nope-5", "t", b"stray answer", end_stream=False, reply=True),
        frames.window("nope-6", "t", 65536, reply=True),
        frames.reset("nope-7", "t", "cancelled", "", reply=True),
        frames.response_head("nope-8", "t", status=200, reason="OK", headers=[], end_stream=True),
    ]

    async def main():
        t = RawTunnel(stack.tunnel_port)
        try:
            assert (await t.hello("raw")).accepted
            await t.send_frames(*unknown[:4])  # one batch ...
            for f in unknown[4:]:  # ... and one frame per message
                await t.send_frames(f)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: wait_until(
                lambda: _raw_streams(stack, "raw") and _raw_streams(stack, "raw")[0]["unknown_frames"] == len(unknown),
                5, what="unknown frames counted"))
            # The same stream still works: an egress request on it is answered.
            await t.send_frames(frames.request_head(
                "raw-1", "trace-raw-1", method="GET", path="/hello?from=raw", scheme="http",
                authority="127.0.0.1", headers=[("Host", "127.0.0.1")], end_stream=True, timeout_ms=5000))
            head, body = None, b""
            while True:
                batch = await t.read()
                assert batch is not None, "gateway closed the stream"
                for f in batch:
                    assert f.request_id == "raw-1" and f.reply, f
                    kind = f.WhichOneof("kind")
                    if kind == "headers":
                        head = f.headers
                    elif kind == "data":
                        body += f.data.data
                if head is not None and (head.end_stream or any(f.WhichOneof("kind") == "data" and f.data.end_stream
                                                                for f in batch)):
                    return head, body
        finally:
            await t.close()

    head, body = asyncio.run(main())
    assert head.status == 200 and len(body) == 100
    streams = _raw_streams(stack, "raw")  # once: the stream may go between two reads
    assert streams == [] or streams[0]["unknown_frames"] == len(unknown)
    _still_serving(stack)
    stack.wait_idle()


# -- wrong token, unknown group ----------------------------------------------------------------


def test_wrong_token_and_unknown_group_are_refused_alike_and_stop_the_client(stack):
    cases = {
        "badtoken": ("g1", "sekrit-wrong-token-0001", "bad_token"),
        "badgroup": ("no-such-group", "sekrit-any-token-0002", "unknown_group"),
    }
    for cid, (group, token, _reason) in cases.items():
        stack.start_client(cid, group=group, token=token, wait=False)
    for cid in cases:
        proc = stack.clients[cid][0]
        wait_until(lambda: not proc.alive(), 15, what=f"{cid} refused and stopped")
    connected = {c["client_id"] for c in get_json(f"http://127.0.0.1:{stack.admin_port}/admin/clients")["clients"]}
    gateway_log = stack.gateway.output()
    gateway_lines = [json.loads(line) for line in gateway_log.splitlines() if line.startswith("{")]
    for cid, (group, token, reason) in cases.items():
        proc = stack.clients[cid][0]
        out = proc.output()
        # A refusal no retry mends: one answer, the same for both, and the client stops (status 2).
        assert proc.popen.returncode == 2, out
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        rejected = [l for l in lines if l["msg"].startswith("gateway rejected this client")]
        assert 1 <= len(rejected) <= 2, out  # at most one answer per tunnel connection
        assert rejected[0]["level"] == "error" and rejected[0]["code"] == "bad_credentials"
        assert rejected[0]["msg"] == "gateway rejected this client: bad_credentials: group or token not accepted"
        assert not any(l["msg"] == "reconnecting" for l in lines)
        assert not any(l["msg"] == "tunnel connected" for l in lines)
        assert token not in out
        assert cid not in connected
        # The gateway logs the attempt and why (the detail the client is not told), never the token.
        assert any(l["msg"].startswith("tunnel rejected") and l["reason"] == reason and l["code"] == "bad_credentials"
                   for l in gateway_lines), gateway_log
        assert token not in gateway_log
    assert 2 <= gateway_log.count("tunnel rejected") <= 4
    _still_serving(stack)


# -- oversize heads and bodies ---------------------------------------------------------------------


@pytest.mark.parametrize("way", ["ingress", "egress"])
@pytest.mark.parametrize("shape", ["one-big-header", "many-headers", "long-url"])
def test_oversize_head_431(shared, way, shape):
    stack = shared
    port = stack.http_port if way == "ingress" else stack.clients["c1"][1]
    target, headers = "/hello", []
    if shape == "one-big-header":
        headers = [("X-Big", "b" * 5000)]
    elif shape == "many-headers":
        headers = [(f"X-H{i}", "v" * 90) for i in range(60)]
    else:
        target = "/hello?q=" + "u" * 5000
    r = raw_request(port, "GET", target, headers)
    assert r.status == 431, (r.status, r.body[:200])
    body = r.json()
    assert body["error"] == "headers_too_large"
    assert body["request_id"] == r.header("x-request-id") and body["trace_id"] == r.header("x-trace-id")
    # Just under the limit is fine.
    assert raw_request(port, "GET", "/hello", [("X-Big", "b" * 3000)]).status == 200
    stack.wait_idle()


@pytest.mark.parametrize("way", ["ingress", "egress"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_over_the_limit_413(shared, way, framing):
    stack = shared
    base = stack.url if way == "ingress" else stack.local_url()
    limit = 256 * 1024
    over = b"z" * (limit + 64 * 1024)
    if framing == "content-length":
        r = http("POST", f"{base}/sink", over)
    else:
        r = http("POST", f"{base}/sink", (over[i:i + 8192] for i in range(0, len(over), 8192)))
    assert r.status == 413, (r.status, r.body[:200])
    body = r.json()
    assert body["error"] == "body_too_large"
    assert body["request_id"] == r.header("x-request-id") and body["trace_id"] == r.header("x-trace-id")
    # Exactly the limit passes, either way.
    at_limit = b"z" * limit
    if framing == "content-length":
        ok = http("POST", f"{base}/sink", at_limit)
    else:
        ok = http("POST", f"{base}/sink", (at_limit[i:i + 8192] for i in range(0, limit, 8192)))
    assert ok.status == 200 and ok.json()["size"] == limit
    # The cut upload left nothing behind on either side.
    stack.wait_idle()


# -- a client of another version -------------------------------------------------------------


@pytest.mark.parametrize("fields", [False, True], ids=["without-header_fields", "with-header_fields"])
def test_heads_use_header_fields_only_with_a_client_that_announced_it(make_stack, fields):
    """A client that predates `header_fields` gets and may send heads the old way, both directions."""

    def to_raw(stack: Stack, doc: dict) -> None:
        _raw_group(stack, doc)
        doc["routes"] = [{"path_prefix": "/to-raw", "group": "raw"}, *doc["routes"]]

    stack = make_stack(settings={"workers": 1}, edit=to_raw, client=None)
    capabilities = ("http", frames.HEADER_FIELDS) if fields else ("http",)

    def form(head) -> bool:
        assert bool(head.header_fields) != bool(head.headers), head
        return bool(head.header_fields)

    async def main():
        loop = asyncio.get_running_loop()
        t = RawTunnel(stack.tunnel_port)
        try:
            welcome = await t.hello("raw", capabilities=capabilities)
            assert welcome.accepted and (frames.HEADER_FIELDS in welcome.capabilities) == fields
            await loop.run_in_executor(None, lambda: wait_until(lambda: _raw_streams(stack, "raw"), 5, what="raw stream"))
            # Ingress: the gateway's request head, then our answer in the form we announced.
            caller = loop.run_in_executor(None, lambda: http("GET", f"{stack.url}/to-raw", headers={"X-Probe": "1"}))
            (req,) = await t.read()
            assert req.WhichOneof("kind") == "headers" and form(req.headers) == fields
            assert ("X-Probe", "1") in frames.header_list(req.headers)
            await t.send_frames(frames.response_head(req.request_id, req.trace_id, status=203, reason="",
                                                     headers=[("X-From-Raw", "yes")], end_stream=True, fields=fields))
            answer = await caller
            # Egress: our request head; the gateway's answer in the form we announced.
            await t.send_frames(frames.request_head(
                "raw-e1", "trace-raw-e1", method="GET", path="/hello", scheme="http", authority="127.0.0.1",
                headers=[("Host", "127.0.0.1"), ("X-Probe", "2")], end_stream=True, timeout_ms=5000, fields=fields))
            batch = await t.read()
            head = batch[0]
            assert head.WhichOneof("kind") == "headers" and head.request_id == "raw-e1"
            return answer, head.headers
        finally:
            await t.close()

    answer, egress_head = asyncio.run(main())
    assert answer.status == 203 and ("X-From-Raw", "yes") in answer.headers
    assert egress_head.status == 200 and form(egress_head) == fields
    assert any(n.lower() == "content-type" for n, _ in frames.header_list(egress_head))
