"""Our own HTTP/2 framing of the tunnel (gateway/tunnel/h2_*.py): the client's
(`tunnel_library = "builtin"`) and the gateway's (`tunnel_server = "builtin"`),
each against the other and against grpcio at the other end: requests both ways,
16 MiB bodies, many at once, TLS and mTLS; then the client's edges on a real
grpc.aio server in this process (status, limits, a lost or silent peer, flow
control), frame by frame against a peer written here (padding, CONTINUATION,
resets, GOAWAY, PING, a message split at every byte), and the gateway's end
against a stock grpcio client (tests/test_tunnel_h2_server.py)."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import struct

import aiohttp
import grpc
import grpc.aio
import pytest
from hpack import Encoder
from hypothesis import given, settings, strategies as st

from gateway.tunnel.h2_call import CallFailed, H2Channel, H2ClientConnection, H2ClientTransport, h2_transport_closed
from gateway.tunnel.h2_frames import CONNECTION_WINDOW, STREAM_WINDOW, H2Stream
from gateway.tunnel.pieces import Pieces
from gateway.tunnel.stream import TunnelStream
from gateway.tunnel.transport import grpc_options, open_client_call, tunnel_handler
from tests.harness import Stack, get_json, http, wait_until
from tests.test_auth_tls import pki  # noqa: F401,F811  (the fixture)
from tests.test_bodies import _download, _upload
from tests.test_unit_stream import async_test, limits, unexpected

BIG = 16 << 20


def _library(stack: Stack, client_id: str, library: str) -> None:
    """The client's connections went through `library` (its "tunnel connected" lines say so)."""
    out = stack.clients[client_id][0].output()
    other = "grpcio" if library == "builtin" else "builtin"
    assert f'"library":"{library}"' in out and f'"library":"{other}"' not in out, out[-2000:]


@pytest.fixture(scope="module", params=[("builtin", "builtin"), ("grpcio", "builtin"), ("builtin", "grpcio")],
                ids=["builtin-client-builtin-gateway", "grpcio-client", "grpcio-gateway"])
def any_stack(make_module_stack, request) -> Stack:
    library, server = request.param
    stack = make_module_stack(settings={"workers": 1, "tunnel_server": server},
                              client_extra=["--tunnel-library", library])
    stack.library = library
    return stack


@pytest.mark.parametrize("way", ["ingress", "egress"])
def test_requests_and_16_mib_bodies_both_ways(any_stack, way):
    stack = any_stack
    _library(stack, "c1", stack.library)
    base = stack.url if way == "ingress" else stack.local_url()
    r = http("POST", f"{base}/echo/x?a=1", b"payload", {"X-Test": "yes"})
    echo = r.json()
    assert r.status == 200 and echo["size"] == 7 and echo["method"] == "POST"
    assert ["X-Test", "yes"] in [list(h) for h in echo["headers"]]
    data = os.urandom(BIG)
    status, answer = asyncio.run(_upload(f"{base}/sink", data))
    assert status == 200 and answer == {"sha256": hashlib.sha256(data).hexdigest(), "size": BIG}
    status, _length, digest, n = asyncio.run(_download(f"{base}/bytes/{BIG}"))
    assert (status, n) == (200, BIG) and digest == hashlib.sha256(b"\xab" * BIG).hexdigest()


def test_many_requests_at_once(any_stack):
    stack = any_stack

    async def run() -> list[tuple[int, int]]:
        async with aiohttp.ClientSession() as s:
            async def one(i: int) -> tuple[int, int]:
                base = stack.url if i % 2 else stack.local_url()
                async with s.get(f"{base}/bytes/{1000 + i * 997}") as r:
                    return r.status, len(await r.read())
            return await asyncio.gather(*(one(i) for i in range(200)))

    assert asyncio.run(run()) == [(200, 1000 + i * 997) for i in range(200)]
    stack.wait_idle()


def test_tls_and_mtls(make_stack, pki):  # noqa: F811
    tls = ["--tls", "--tls-ca", str(pki / "ca.pem")]
    cert = ["--tls-cert", str(pki / "good.pem"), "--tls-key", str(pki / "good.key")]
    stack = make_stack(settings={"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key"),
                                 "tls_client_ca": str(pki / "ca.pem")}, client="good", client_extra=[*tls, *cert])
    assert http("GET", f"{stack.url}/hello").status == 200
    assert {c["client_id"] for c in get_json(f"{stack.admin_url}/admin/clients")["clients"]} == {"good"}
    # Without a certificate the gateway's TLS refuses it; with a CA it does not trust, it refuses the gateway.
    stack.start_client("anon", wait=False, extra=tls)
    stack.start_client("wary", wait=False, extra=["--tls", "--tls-ca", str(pki / "other-ca.pem"), *cert])
    for name in ("anon", "wary"):
        wait_until(lambda n=name: "cannot reach gateway" in stack.clients[n][0].output(), 15, what=f"{name} refused")
    # --insecure: the gateway's own certificate, with a warning.
    stack.start_client("c4", extra=["--insecure", *cert])
    assert "NOT verified" in stack.clients["c4"][0].output()
    assert http("GET", f"{stack.url}/hello").status == 200
    _library(stack, "good", "builtin")
    _library(stack, "c4", "builtin")


# -- the transport alone, on a grpc.aio server in this process ---------------------------


async def _server(serve, limit: int = 4 << 20, keepalive_ms: int = 5000) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=grpc_options(limit, keepalive_ms, server=True))
    server.add_generic_rpc_handlers([tunnel_handler(serve, limit)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _call(port: int, max_message: int = 1 << 20, **kw) -> tuple[H2Channel, H2ClientTransport]:
    channel = H2Channel(f"127.0.0.1:{port}", max_message=max_message, **kw)
    return channel, H2ClientTransport(channel)


@async_test
async def test_messages_stay_bytes_and_the_end_reads_as_none():
    async def echo(t) -> None:
        for _ in range(4):
            msg = await t.read()
            await t.write(msg[::-1])

    server, port = await _server(echo, limit=8 << 20)
    channel, t = _call(port, max_message=8 << 20)
    try:
        # 5 MiB: more than the gateway's first window, so it goes out in frames as WINDOW_UPDATEs come.
        for msg in (b"abc", b"", os.urandom(300_000), os.urandom(5 << 20)):
            await t.write(msg)
            assert await t.read() == msg[::-1]
        assert await t.read() is None  # the servicer returned: status OK
        with pytest.raises(CallFailed):
            await t.write(b"late")
    finally:
        await channel.close()
        await server.stop(0)


async def refuse(t) -> None:
    """A servicer that turns the call away after its first message, as tunnel admission does."""
    await t.read()
    t.refuse("tunnel admission: retry later")


@async_test
async def test_status_and_limits_are_named():
    async def big(t) -> None:
        await t.read()
        await t.write(b"\0" * 3000)
        await asyncio.sleep(5)

    server, port = await _server(refuse)
    server2, port2 = await _server(big)
    try:
        channel, t = _call(port)
        await t.write(b"hello")
        with pytest.raises(CallFailed) as err:
            await t.read()
        assert err.value.code == "RESOURCE_EXHAUSTED" and "admission" in err.value.details
        assert h2_transport_closed(err.value) is None
        await channel.close()
        channel, t = _call(port2, max_message=2000)
        await t.write(b"hello")
        with pytest.raises(CallFailed) as err:
            await t.read()
        assert h2_transport_closed(err.value).reason == "message_too_large"
        await channel.close()
        channel, t = _call(port2, max_message=2000)
        with pytest.raises(CallFailed) as err:
            await t.write(b"\0" * 2001)
        assert h2_transport_closed(err.value).reason == "message_too_large"
        await channel.close()
    finally:
        await server.stop(0)
        await server2.stop(0)


@async_test
async def test_an_unreachable_gateway_is_an_os_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        channel, t = _call(port, connect_timeout=2)
        with pytest.raises(OSError):
            await t.write(b"x")


@async_test
async def test_a_lost_connection_closes_the_stream_as_connection_lost(caplog):
    caplog.set_level(logging.INFO, logger="gateway.tunnel")
    got = asyncio.Event()

    async def hold(t) -> None:
        await t.read()
        got.set()
        await asyncio.sleep(30)

    server, port = await _server(hold)
    channel, t = _call(port)
    await t.write(b"hi")
    stream = TunnelStream(t, limits=limits(heartbeat_interval=0), on_request=unexpected, peer_id="gateway")
    run = asyncio.ensure_future(stream.run())
    await asyncio.wait_for(got.wait(), 5)
    await server.stop(0)
    await asyncio.wait_for(run, 5)
    assert stream.close_reason == "connection_lost", stream.close_reason
    await channel.close()


@async_test
async def test_a_slow_reader_holds_the_gateway_back():
    """The gateway cannot send more than the window ahead of what the call reads."""
    sent = 0

    async def flood(t) -> None:
        nonlocal sent
        await t.read()
        for _ in range(64):
            await t.write(b"\1" * (1 << 20))
            sent += 1

    server, port = await _server(flood, limit=2 << 20)
    channel, t = _call(port, max_message=2 << 20)
    try:
        await t.write(b"go")
        await asyncio.sleep(1.0)  # the call reads nothing meanwhile
        assert 2 <= sent <= STREAM_WINDOW // (1 << 20) + 2, sent
        for _ in range(64):
            assert len(await t.read()) == 1 << 20
        assert await t.read() is None and sent == 64
    finally:
        await channel.close()
        await server.stop(0)


# -- frame by frame, against a peer written here ------------------------------------------

F = struct.Struct(">IBI")


def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    return F.pack(len(payload) << 8 | kind, flags, sid) + payload


def message(body: bytes) -> bytes:
    return struct.pack(">BI", 0, len(body)) + body


def headers_block(fields: list[tuple[str, str]], enc: Encoder | None = None) -> bytes:
    return (enc or Encoder()).encode(fields)


class Peer:
    """A gateway's side of the bytes, frame by frame: what the connection wrote, and what it read."""

    def __init__(self, max_message: int = 1 << 20) -> None:
        self.conn = H2ClientConnection(max_message)
        self.out = bytearray()
        self.aborted = False
        peer = self

        class Sink(asyncio.Transport):
            def write(self, data) -> None:
                if peer.aborted:  # as uvloop's, once the socket is closed
                    raise RuntimeError("unable to perform operation: the handler is closed")
                peer.out += data

            def writelines(self, parts) -> None:
                for p in parts:
                    self.write(p)

            def abort(self) -> None:
                peer.aborted = True

            def is_closing(self) -> bool:
                return peer.aborted

        self.enc = Encoder()
        self.conn.connection_made(Sink())

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        data = bytes(self.out)
        assert data.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        pos, out = 24, []
        while pos < len(data):
            kind, flags, sid = F.unpack_from(data, pos)
            n = kind >> 8
            out.append((kind & 0xFF, flags, sid, data[pos + 9:pos + 9 + n]))
            pos += 9 + n
        return out

    def open(self) -> bytes:
        return frame(4, 0, 0, b"") + frame(1, 4, 1, headers_block([(":status", "200")], self.enc))

    def trailers(self, status: int = 0, msg: str = "") -> bytes:
        fields = [("grpc-status", str(status))] + ([("grpc-message", msg)] if msg else [])
        return frame(1, 5, 1, headers_block(fields, self.enc))

    def read_all(self) -> list[bytes]:
        """The messages read so far, joined (a big one is queued in the pieces it came in)."""
        out = [m.joined() if type(m) is Pieces else m for m in self.conn.call.messages]
        self.conn.call.messages.clear()
        return out


@async_test
async def test_padding_continuation_ping_and_trailers():  # a Peer's connection needs a running loop (its keepalive)
    p = Peer()
    block = headers_block([(":status", "200"), ("content-type", "application/grpc")], p.enc)
    padded = bytes([3]) + message(b"hello") + b"\0\0\0"
    p.conn.data_received(frame(4, 0, 0, struct.pack(">HI", 4, 1 << 20)) + frame(1, 0, 1, block[:3])
                         + frame(9, 4, 1, block[3:]) + frame(0, 8, 1, padded) + frame(6, 0, 0, b"12345678"))
    assert p.read_all() == [b"hello"]
    sent = p.frames()
    assert (4, 1, 0, b"") in sent  # SETTINGS acknowledged
    assert (6, 1, 0, b"12345678") in sent  # PING answered
    assert p.conn.call.send_window == 1 << 20  # the gateway's INITIAL_WINDOW_SIZE applied
    p.conn.data_received(p.trailers())
    assert p.conn.call.remote_done and p.conn.call.error is None and not p.aborted


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=400_000), max_size=12),
       sizes=st.lists(st.integers(min_value=0, max_value=150_000), min_size=1, max_size=6),
       frame_size=st.sampled_from([7, 1000, 16384, 1 << 20]))
def test_messages_split_anywhere_read_the_same(cuts, sizes, frame_size):
    """Messages cut into DATA frames of any size, the bytes cut into reads anywhere."""
    asyncio.run(_split_anywhere(cuts, sizes, frame_size))


async def _split_anywhere(cuts: list[int], sizes: list[int], frame_size: int) -> None:
    p = Peer()
    bodies = [os.urandom(n) for n in sizes]
    data = b"".join(message(b) for b in bodies)
    wire = p.open() + b"".join(frame(0, 0, 1, data[i:i + frame_size]) for i in range(0, len(data), frame_size))
    wire += p.trailers()
    pos = 0
    for cut in sorted(set(c for c in cuts if c < len(wire))) + [len(wire)]:
        p.conn.data_received(wire[pos:cut])
        pos = cut
    assert p.read_all() == bodies
    assert p.conn.call.remote_done and p.conn.call.error is None


@pytest.mark.parametrize("wire, code, words", [
    (frame(3, 0, 1, struct.pack(">I", 8)), "CANCELLED", "reset"),
    (frame(7, 0, 0, struct.pack(">II", 0, 11) + b"too_many_pings"), "UNAVAILABLE", "too_many_pings"),
    (frame(0, 0, 1, b"\1\0\0\0\1x"), "INTERNAL", "compressed"),
    (frame(0, 0, 1, message(b"\0" * 50)), "RESOURCE_EXHAUSTED", "larger than max"),
    (F.pack(((2 << 20) << 8) | 0, 0, 1), "INTERNAL", "FRAME_SIZE_ERROR"),
    (frame(1, 4, 1, b"\xff\xff\xff\xff"), "INTERNAL", "COMPRESSION_ERROR"),
    (frame(5, 4, 1, b"\0\0\0\2"), "INTERNAL", "PUSH_PROMISE"),
    (frame(1, 5, 1, headers_block([("grpc-status", "14"), ("grpc-message", "going%20away")])), "UNAVAILABLE",
     "going away"),
    (frame(0, 1, 1, message(b"x")), "UNKNOWN", "without a status"),
    (frame(6, 0, 0, b"1234"), "INTERNAL", "FRAME_SIZE_ERROR"),
    (frame(4, 0, 0, struct.pack(">HI", 5, 0)), "INTERNAL", "max frame size of 0"),
    (frame(4, 0, 0, b"\0\4\0"), "INTERNAL", "multiple of 6"),
    (frame(8, 0, 1, struct.pack(">I", 0)), "INTERNAL", "WINDOW_UPDATE of 0"),
    (frame(8, 0, 0, struct.pack(">I", 0x7FFFFFFF)), "INTERNAL", "FLOW_CONTROL_ERROR"),
    (frame(0, 0, 0, b"x"), "INTERNAL", "DATA on stream 0"),
    (frame(1, 0, 1, b"\0" * 40000) + frame(9, 0, 1, b"\0" * 40000), "INTERNAL", "ENHANCE_YOUR_CALM"),
    (frame(0, 0, 1, message(b"\0" * 30)) * 5, "INTERNAL", "FLOW_CONTROL_ERROR"),
], ids=["rst_stream", "goaway", "compressed", "too_large", "frame_size", "hpack", "push", "status", "no_status",
        "ping_size", "settings_frame_size", "settings_length", "window_zero", "window_overflow", "data_stream_0",
        "continuation_flood", "past_the_window"])
@async_test
async def test_bad_or_ending_frames_fail_the_call_by_name(wire, code, words, monkeypatch):
    # A small window for past_the_window: 5 messages of 35 bytes, never read, pass 100.
    monkeypatch.setattr("gateway.tunnel.h2_connection.STREAM_WINDOW", 100)
    p = Peer(max_message=40)
    p.conn.data_received(p.open() + wire)
    error = p.conn.call.error
    assert error is not None and error.code == code and words in str(error), error
    assert p.aborted or code == "CANCELLED"  # a reset ends the call; the channel's close then drops the connection


@async_test
async def test_a_graceful_goaway_lets_the_call_finish():
    p = Peer()
    p.conn.data_received(p.open() + frame(7, 0, 0, struct.pack(">II", 1, 0)) + frame(0, 0, 1, message(b"ok")))
    assert p.conn.call.error is None and p.read_all() == [b"ok"]


@async_test
async def test_the_window_is_given_back_as_messages_are_read():
    p = Peer(max_message=4 << 20)
    chunk = message(b"\0" * (1 << 20))
    t = H2ClientTransport.__new__(H2ClientTransport)
    t._conn = p.conn

    def updates() -> list[tuple[int, int]]:
        return [(f[2], struct.unpack(">I", f[3])[0]) for f in p.frames() if f[0] == 8]

    # The connection's window is given back at once (each stream's bounds what waits); the call's after
    # the second message, and then no more while over half of its window waits to be read.
    p.conn.data_received(p.open() + frame(0, 0, 1, chunk) * 5)
    assert updates() == [(0, CONNECTION_WINDOW - 65535), (1, 2 * len(chunk)), (0, 5 * len(chunk))]
    await t.read()
    assert len(updates()) == 3  # 4 MiB still queued
    await t.read()
    assert updates()[3:] == [(1, 3 * len(chunk))]


@async_test
async def test_a_gateway_that_answers_no_ping_is_found(monkeypatch):
    monkeypatch.setattr("gateway.tunnel.h2_call.CLIENT_KEEPALIVE_MS", 200)
    listener = await asyncio.start_server(lambda r, w: r.read(1 << 20), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    channel, t = _call(port)
    try:
        await t.write(b"hi")
        with pytest.raises(CallFailed) as err:
            await asyncio.wait_for(t.read(), 5)
        assert h2_transport_closed(err.value).reason == "heartbeat_timeout"
    finally:
        await channel.close()
        listener.close()


@async_test
async def test_a_stock_grpcio_client_still_connects():
    """The gateway's tunnel port is plain gRPC: grpcio's own client works beside ours."""
    async def echo(t) -> None:
        while (msg := await t.read()) is not None:
            await t.write(msg + b"!")

    server, port = await _server(echo)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = open_client_call(ch)
            await call.write(b"a")
            assert await call.read() == b"a!"
            await call.done_writing()
        channel, t = _call(port)
        await t.write(b"b")
        assert await t.read() == b"b!"
        await channel.close()
    finally:
        await server.stop(0)


@async_test
async def test_a_peer_that_asks_without_reading_is_cut():
    """PINGs (each asks for an ACK) while our writes back up: at most MAX_OWED answers, then the connection goes."""
    p = Peer()
    p.conn.data_received(p.open())
    p.conn.pause_writing()  # the peer reads nothing
    p.conn.data_received(frame(6, 0, 0, b"12345678") * 1001)
    assert p.aborted and "ENHANCE_YOUR_CALM" in str(p.conn.call.error)


@async_test
async def test_a_cancelled_writer_leaves_the_others_waiting():
    """Writers waiting for a window share one future: cancelling one must not cancel the rest."""
    p = Peer()
    conn = p.conn
    p.conn.data_received(p.open())
    other = H2Stream(3, 0)
    other.headers = {}
    conn.streams[3] = other
    conn.call.send_window = 0
    first = asyncio.ensure_future(conn.send_message(conn.call, b"a" * 10))
    second = asyncio.ensure_future(conn.send_message(other, b"b" * 10))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.01)
    assert not second.done()
    conn.data_received(frame(8, 0, 3, struct.pack(">I", 100)))
    await asyncio.wait_for(second, 2)
    assert first.cancelled() and p.frames()[-1][:3] == (0, 0, 3)


@async_test
async def test_a_connection_closing_under_a_call_is_an_os_error():
    """The socket may close (a gateway that hung up, a TLS port spoken to in clear) before
    connection_lost says so: the call's writes and reads then raise CallFailed (an OSError),
    never the socket's RuntimeError, and nothing more is written."""
    p = Peer(max_message=4 << 20)
    p.conn.data_received(p.open() + frame(0, 0, 1, message(b"\0" * (3 << 20))))
    p.aborted = True  # closed, connection_lost not yet called
    t = H2ClientTransport.__new__(H2ClientTransport)
    t._conn = p.conn
    assert len(await t.read()) == 3 << 20  # queued before: read; its window is not given back on a closed socket
    with pytest.raises(OSError):
        await t.write(b"x")
    await t.close()
    p.conn.connection_lost(None)
    with pytest.raises(OSError):
        await t.read()
