"""The gateway's end of the tunnel on our own HTTP/2 (gateway/tunnel/h2_server.py)
against a stock grpcio client and against ours, in this process: calls and
their status, several calls on one connection, limits, other methods, what
is not HTTP/2, a client gone, the server's stop; mTLS names as grpc gave them."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from typing import Callable

import grpc
import grpc.aio
import pytest
from hpack import Encoder
from hypothesis import given, settings, strategies as st

from gateway.tunnel.errors import TransportClosed
from gateway.tunnel.h2_call import CallFailed, H2Channel, H2ClientTransport
from gateway.tunnel.h2_frames import PREFACE
from gateway.tunnel.h2_server import H2ServerConnection, TunnelServer, grpc_peer, server_ssl_context
from gateway.tunnel.transport import CLIENT_MAX_MESSAGE, METHOD, grpc_options, open_client_call
from tests.test_auth_tls import pki  # noqa: F401  (the fixture)
from tests.test_tunnel_h2 import refuse
from tests.test_unit_stream import async_test


async def _serve(serve, max_message: int = 1 << 20, **kw) -> tuple[TunnelServer, int]:
    server = TunnelServer(serve, max_message=max_message, keepalive=5.0, **kw)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await server.listen("127.0.0.1", port)
    return server, port


def _grpc_channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                     options=grpc_options(CLIENT_MAX_MESSAGE, 10_000, server=False))


async def until(condition, seconds: float = 2.0) -> None:
    """Poll `condition` on the loop until it holds, failing after `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def second_read() -> tuple[Callable, list, asyncio.Event]:
    """A servicer that reads a first message (then sets the event) and records how its second
    read ends: the message, None (the call's end in order) or the reason the transport gives."""
    ended: list[object] = []
    started = asyncio.Event()

    async def serve(t) -> None:
        await t.read()
        started.set()
        try:
            ended.append(await t.read())
        except TransportClosed as exc:
            ended.append(exc.reason)

    return serve, ended, started


async def _echo(t) -> None:
    while (msg := await t.read()) is not None:
        await t.write(msg[::-1])


@async_test
async def test_a_grpcio_client_several_calls_on_one_connection():
    seen = []

    async def serve(t) -> None:
        seen.append(t.peer())
        await _echo(t)

    server, port = await _serve(serve, max_message=8 << 20)
    try:
        async with _grpc_channel(port) as ch:
            calls = [open_client_call(ch) for _ in range(3)]
            for i, call in enumerate(calls):
                await call.write(b"abc%d" % i)
            for i, call in enumerate(calls):
                assert await call.read() == (b"abc%d" % i)[::-1]
            big = os.urandom(5 << 20)  # more than the first windows: frames as WINDOW_UPDATEs come
            await calls[0].write(big)
            assert await calls[0].read() == big[::-1]
            for call in calls:
                await call.done_writing()  # the servicer's read returns None, it returns: OK
                assert await call.read() is grpc.aio.EOF
                assert await call.code() == grpc.StatusCode.OK
        assert len(seen) == 3 and all(p.startswith("ipv4:127.0.0.1:") for p in seen)
    finally:
        await server.stop(0)


@async_test
async def test_status_limits_and_other_methods():
    got: list[BaseException] = []

    async def strict(t) -> None:
        try:
            await t.read()
        except TransportClosed as exc:
            got.append(exc)

    server, port = await _serve(refuse)
    server2, port2 = await _serve(strict, max_message=1000)
    try:
        async with _grpc_channel(port) as ch:
            call = open_client_call(ch)
            await call.write(b"hello")
            assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "admission" in await call.details()
            # (No write: grpcio's client may report a write racing the refusal as INTERNAL.)
            other = ch.stream_stream("/tunnel.v1.Tunnel/Other")()
            assert await other.code() == grpc.StatusCode.UNIMPLEMENTED
        async with _grpc_channel(port2) as ch:
            call = open_client_call(ch)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.write(b"\0" * 1001)
            assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max (1001 vs. 1000)" in await call.details()
        assert [e.reason for e in got] == ["message_too_large"]
        # Ours reads the same status.
        channel = H2Channel(f"127.0.0.1:{port}", max_message=1 << 20)
        t = H2ClientTransport(channel)
        await t.write(b"hello")
        with pytest.raises(CallFailed) as err:
            await t.read()
        assert err.value.code == "RESOURCE_EXHAUSTED" and "admission" in err.value.details
        await channel.close()
    finally:
        await server.stop(0)
        await server2.stop(0)


@async_test
async def test_a_refusal_before_any_read_reaches_a_grpcio_client_as_sent():
    """Admission refuses a connection before reading its HELLO. Ended at once, grpcio's client
    (its HELLO write racing the status) reports INTERNAL; the refusal waits for that write."""
    async def admission(t) -> None:
        t.refuse("tunnel admission: too many connections from this address; retry later")

    server, port = await _serve(admission)
    try:
        for _ in range(10):
            async with _grpc_channel(port) as ch:
                call = open_client_call(ch)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call.write(b"hello")
                assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "admission" in await call.details()
    finally:
        await server.stop(0)


@async_test
async def test_what_is_not_http2_is_closed_and_the_port_serves_on():
    server, port = await _serve(_echo)
    try:
        for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", os.urandom(64)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(junk)
            data = await asyncio.wait_for(reader.read(), 5)  # whatever it says, it closes
            writer.close()
            assert len(data) < 200
        channel = H2Channel(f"127.0.0.1:{port}", max_message=1 << 20)
        t = H2ClientTransport(channel)
        await t.write(b"still")
        assert await t.read() == b"llits"
        await channel.close()
        await until(lambda: not server.connections)  # every connection, the junk's and ours, gone
    finally:
        await server.stop(0)


@async_test
async def test_a_call_the_client_cancels_ends_as_closed_by_peer():
    """grpcio's cancel is an RST_STREAM(CANCEL): the client's choice, not a fault."""
    hold, ended, started = second_read()
    server, port = await _serve(hold)
    try:
        async with _grpc_channel(port) as ch:
            call = open_client_call(ch)
            await call.write(b"hi")
            await asyncio.wait_for(started.wait(), 5)
            call.cancel()
            await until(lambda: ended)
        assert ended == ["closed_by_peer"]
    finally:
        await server.stop(0)


@pytest.mark.parametrize("how", ["killed", "closed"])
@async_test
async def test_a_client_gone_or_done(how):
    """A client whose connection drops (killed): the call's read raises connection_lost. One that
    closes its channel: the call ends in order, the read returns None (the stream: closed_by_peer)."""
    hold, ended, started = second_read()
    server, port = await _serve(hold)
    try:
        channel = H2Channel(f"127.0.0.1:{port}", max_message=1 << 20)
        t = H2ClientTransport(channel)
        await t.write(b"hi")
        await asyncio.wait_for(started.wait(), 5)
        if how == "killed":
            channel.connection.transport.abort()  # no END_STREAM, no RST: as a process that died
        else:
            await channel.close()
        await until(lambda: ended and not server.connections)
        assert ended == (["connection_lost"] if how == "killed" else [None])
        assert not server.connections and not server.tasks
    finally:
        await server.stop(0)


@async_test
async def test_stop_gives_running_calls_their_grace_then_ends_them():
    hold, reasons, _started = second_read()
    server, port = await _serve(hold)
    channel = H2Channel(f"127.0.0.1:{port}", max_message=1 << 20)
    t = H2ClientTransport(channel)
    await t.write(b"hi")
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await server.stop(0.3)
    assert 0.25 <= loop.time() - t0 < 3
    assert reasons == ["gateway_stopping"]
    with pytest.raises(CallFailed) as err:
        await asyncio.wait_for(t.read(), 5)
    assert err.value.code in ("UNAVAILABLE", "CANCELLED")
    # Stopped: nothing listens any more.
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await channel.close()


@async_test
async def test_mtls_names_read_as_grpc_gave_them(pki):  # noqa: F811
    names = []

    async def serve(t) -> None:
        names.append(t.auth_context())
        await _echo(t)

    ctx = server_ssl_context(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"))
    server, port = await _serve(serve, ssl_context=ctx)
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes(),
                                             private_key=(pki / "good.key").read_bytes(),
                                             certificate_chain=(pki / "good.pem").read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=[
                ("grpc.ssl_target_name_override", "localhost")]) as ch:
            call = open_client_call(ch)
            await call.write(b"tls")
            assert await call.read() == b"slt"
        assert names and names[0]["x509_common_name"] == [b"edge-1.agents.test"]
        assert names[0]["x509_subject_alternative_name"] == [b"edge-1.agents.test"]
        # Without a client certificate the handshake fails: no call is served.
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(
                root_certificates=(pki / "ca.pem").read_bytes()),
                options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
            call = open_client_call(ch)
            with pytest.raises(grpc.aio.AioRpcError):
                await call.write(b"anon")
            assert await call.code() == grpc.StatusCode.UNAVAILABLE
        assert len(names) == 1
    finally:
        await server.stop(0)


def test_peer_names_are_grpcs():
    assert grpc_peer(("10.0.0.1", 5000)) == "ipv4:10.0.0.1:5000"
    assert grpc_peer(("::1", 5000, 0, 0)) == "ipv6:[::1]:5000"
    assert METHOD == "/tunnel.v1.Tunnel/Connect"


# -- fuzz: whatever follows the preface, the gateway's end neither raises nor holds on ------------

class _Sink(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = 0
        self.closed = False

    def write(self, data) -> None:
        if self.closed:
            raise RuntimeError("the handler is closed")  # as uvloop's
        self.out += len(data)

    def writelines(self, parts) -> None:
        for p in parts:
            self.write(p)

    def abort(self) -> None:
        self.closed = True

    close = abort

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default


_frame = st.builds(lambda kind, flags, sid, payload: struct.pack(">IBI", len(payload) << 8 | kind, flags, sid) + payload,
                   st.integers(0, 10), st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF]),
                   st.binary(max_size=64))


_CALL_HEADERS = Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", "x"),
                                   ("te", "trailers"), ("content-type", "application/grpc")])
# Frames a real call is made of, so that calls start, read and end among the random ones.
_call_frame = st.one_of(
    st.sampled_from([1, 3, 5]).map(lambda sid: struct.pack(">IBI", len(_CALL_HEADERS) << 8 | 1, 4, sid) + _CALL_HEADERS),
    st.builds(lambda sid, body, flags: struct.pack(">IBI", (len(body) + 5) << 8, flags, sid)
              + struct.pack(">BI", 0, len(body)) + body,
              st.sampled_from([1, 3, 5]), st.binary(max_size=40), st.sampled_from([0, 1])))


@settings(max_examples=300, deadline=None)
@given(frames_=st.lists(st.one_of(_frame, _call_frame), max_size=12), junk=st.binary(max_size=64),
       cut=st.integers(1, 50))
def test_frames_of_any_shape_never_escape_the_connection(frames_, junk, cut):
    async def run() -> None:
        server = TunnelServer(_echo, max_message=1 << 16, keepalive=5.0)
        conn = H2ServerConnection(server)
        sink = _Sink()
        conn.connection_made(sink)
        wire = PREFACE + b"".join(frames_) + junk
        for i in range(0, len(wire), cut):
            conn.data_received(wire[i:i + cut])  # raises nothing, whatever it is
        assert conn._pending_size <= len(wire)
        conn.connection_lost(None)
        await asyncio.sleep(0)
        tasks = set(server.tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        assert not server.tasks and not server.connections  # every call it started ended with it

    asyncio.run(run())
