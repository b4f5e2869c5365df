"""The client's tunnel over grpclib (`tunnel_library = "grpclib"`,
gateway/tunnel/transport_h2.py) against the gateway's grpcio: requests both
ways, 16 MiB bodies, many at once, a gateway killed and back, TLS and mTLS,
and the transport's own edges (status, message limits, a dead peer) on a real
grpc.aio server in this process."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import socket

import aiohttp
import grpc
import grpc.aio
import pytest

from gateway.tunnel.errors import TransportClosed
from gateway.tunnel.stream import TunnelStream
from gateway.tunnel.transport import grpc_options, tunnel_handler
from gateway.tunnel.transport_h2 import CallFailed, H2Channel, H2ClientTransport, h2_transport_closed
from tests.harness import Stack, get_json, http, wait_until
from tests.test_auth_tls import pki  # noqa: F401  (the fixture)
from tests.test_unit_stream import async_test, limits, unexpected

H2 = ["--tunnel-library", "grpclib"]
BIG = 16 << 20


def _library(stack: Stack, client_id: str = "c1") -> None:
    """The client's connections went through grpclib (its "tunnel connected" lines say so)."""
    out = stack.clients[client_id][0].output()
    assert '"library":"grpclib"' in out and '"library":"grpcio"' not in out, out[-2000:]


@pytest.fixture(scope="module")
def h2_stack(make_module_stack) -> Stack:
    return make_module_stack(settings={"workers": 1}, client_extra=H2)


async def _upload(url: str, body: bytes) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=body, timeout=aiohttp.ClientTimeout(total=60)) as r:
            return r.status, await r.json(content_type=None)


async def _download(url: str) -> tuple[int, str, int]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(url, timeout=aiohttp.ClientTimeout(total=60)) as r:
            h = hashlib.sha256()
            n = 0
            async for chunk in r.content.iter_chunked(1 << 16):
                h.update(chunk)
                n += len(chunk)
            return r.status, h.hexdigest(), n


@pytest.mark.parametrize("way", ["ingress", "egress"])
def test_requests_both_ways(h2_stack, way):
    stack = h2_stack
    _library(stack)
    base = stack.url if way == "ingress" else stack.local_url()
    r = http("GET", f"{base}/hello")
    assert r.status == 200 and len(r.body) == 100
    r = http("POST", f"{base}/echo/x?a=1", b"payload", {"X-Test": "yes"})
    echo = r.json()
    assert r.status == 200 and echo["size"] == 7 and echo["method"] == "POST"
    assert ["X-Test", "yes"] in [list(h) for h in echo["headers"]]


@pytest.mark.parametrize("way", ["ingress", "egress"])
def test_a_16_mib_body_each_way(h2_stack, way):
    stack = h2_stack
    base = stack.url if way == "ingress" else stack.local_url()
    data = os.urandom(BIG)
    status, answer = asyncio.run(_upload(f"{base}/sink", data))
    assert status == 200 and answer == {"sha256": hashlib.sha256(data).hexdigest(), "size": BIG}
    status, digest, n = asyncio.run(_download(f"{base}/bytes/{BIG}"))
    assert (status, n) == (200, BIG) and digest == hashlib.sha256(b"\xab" * BIG).hexdigest()


def test_many_requests_at_once(h2_stack):
    stack = h2_stack

    async def run() -> list[tuple[int, int]]:
        async with aiohttp.ClientSession() as s:
            async def one(i: int) -> tuple[int, int]:
                base = stack.url if i % 2 else stack.local_url()
                async with s.get(f"{base}/bytes/{1000 + i * 997}") as r:
                    return r.status, len(await r.read())
            return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(run())
    assert results == [(200, 1000 + i * 997) for i in range(200)]
    stack.wait_idle()


def test_the_client_comes_back_after_the_gateway_is_killed(make_stack):
    stack = make_stack(settings={"workers": 1}, client_extra=H2)
    assert http("GET", f"{stack.url}/hello").status == 200
    for pid in stack.gateway.pids():  # the supervisor and its workers at once: a crash, no GOAWAY
        os.kill(pid, signal.SIGKILL)
    stack.gateway.popen.wait(10)
    client = stack.clients["c1"][0]
    wait_until(lambda: "tunnel lost" in client.output() or "tunnel closed" in client.output(), 15,
               what="the client sees the gateway gone")
    assert client.alive()
    stack.start_gateway(stack.gateway_doc(settings={"workers": 1}))
    wait_until(lambda: stack._client_connected("c1"), 20, what="the client reconnected")
    assert http("GET", f"{stack.url}/hello").status == 200
    assert "Traceback" not in client.output()
    _library(stack)


def test_tls_and_mtls(make_stack, pki):  # noqa: F811
    tls = ["--tls", "--tls-ca", str(pki / "ca.pem")]
    stack = make_stack(settings={"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key"),
                                 "tls_client_ca": str(pki / "ca.pem")}, client="good",
                       client_extra=[*H2, *tls, "--tls-cert", str(pki / "good.pem"), "--tls-key", str(pki / "good.key")])
    assert http("GET", f"{stack.url}/hello").status == 200
    clients = get_json(f"{stack.admin_url}/admin/clients")["clients"]
    assert {c["client_id"] for c in clients} == {"good"}
    # Without a certificate the gateway's TLS refuses it; with a CA it does not trust, it refuses the gateway.
    stack.start_client("anon", wait=False, extra=[*H2, *tls])
    stack.start_client("wary", wait=False, extra=[*H2, "--tls", "--tls-ca", str(pki / "other-ca.pem"),
                                                   "--tls-cert", str(pki / "good.pem"),
                                                   "--tls-key", str(pki / "good.key")])
    for name in ("anon", "wary"):
        wait_until(lambda n=name: "cannot reach gateway" in stack.clients[n][0].output(), 15, what=f"{name} refused")
    # --insecure: the gateway's own certificate, with a warning.
    stack.start_client("c4", extra=[*H2, "--insecure", "--tls-cert", str(pki / "good.pem"),
                                    "--tls-key", str(pki / "good.key")])
    assert "NOT verified" in stack.clients["c4"][0].output()
    _library(stack, "good")
    _library(stack, "c4")


# -- the transport alone, on a grpc.aio server in this process ---------------------------


async def _server(serve, limit: int = 4 << 20) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=grpc_options(limit, 5000, server=True))
    server.add_generic_rpc_handlers([tunnel_handler(serve, limit)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@async_test
async def test_messages_stay_bytes_and_the_end_reads_as_none():
    async def echo(t) -> None:
        for _ in range(3):
            msg = await t.read()
            await t.write(msg[::-1])

    server, port = await _server(echo)
    channel = H2Channel(f"127.0.0.1:{port}")
    try:
        t = H2ClientTransport(channel, 1 << 20)
        for msg in (b"abc", b"", os.urandom(300_000)):
            await t.write(msg)
            assert await t.read() == msg[::-1]
        assert await t.read() is None  # the servicer returned: status OK
    finally:
        await channel.close()
        await server.stop(0)


@async_test
async def test_status_and_limits_are_named():
    async def refuse(t) -> None:
        await t.read()
        t.refuse("tunnel admission: retry later")

    async def big(t) -> None:
        await t.read()
        await t.write(b"\0" * 3000)
        await asyncio.sleep(5)

    server, port = await _server(refuse)
    server2, port2 = await _server(big)
    try:
        channel = H2Channel(f"127.0.0.1:{port}")
        t = H2ClientTransport(channel, 1 << 20)
        await t.write(b"hello")
        with pytest.raises(CallFailed) as err:
            await t.read()
        assert err.value.code == "RESOURCE_EXHAUSTED" and "admission" in err.value.details
        assert h2_transport_closed(err.value) is None
        await channel.close()
        channel = H2Channel(f"127.0.0.1:{port2}")
        t = H2ClientTransport(channel, 2000)
        await t.write(b"hello")
        with pytest.raises(CallFailed) as err:
            await t.read()
        assert h2_transport_closed(err.value).reason == "message_too_large"
        with pytest.raises(CallFailed):
            await t.write(b"\0" * 2001)
        await channel.close()
    finally:
        await server.stop(0)
        await server2.stop(0)


@async_test
async def test_an_unreachable_gateway_is_an_os_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        channel = H2Channel(f"127.0.0.1:{port}", connect_timeout=2)
        with pytest.raises(OSError):
            await H2ClientTransport(channel, 1 << 20).write(b"x")


@async_test
async def test_a_lost_connection_closes_the_stream_as_connection_lost(caplog):
    caplog.set_level(logging.INFO, logger="gateway.tunnel")
    got = asyncio.Event()

    async def hold(t) -> None:
        await t.read()
        got.set()
        await asyncio.sleep(30)

    server, port = await _server(hold)
    channel = H2Channel(f"127.0.0.1:{port}")
    t = H2ClientTransport(channel, 1 << 20)
    await t.write(b"hi")
    stream = TunnelStream(t, limits=limits(heartbeat_interval=0), on_request=unexpected, peer_id="gateway")
    run = asyncio.ensure_future(stream.run())
    await asyncio.wait_for(got.wait(), 5)
    await server.stop(0)
    await asyncio.wait_for(run, 5)
    assert stream.close_reason == "connection_lost", stream.close_reason
    await channel.close()


@async_test
async def test_a_silent_gateway_is_found_by_the_heartbeat():
    """No keepalive of its own: a peer that stops answering ends the stream within
    three heartbeat intervals (heartbeat_timeout)."""
    async def mute(t) -> None:
        await t.read()
        await asyncio.sleep(30)  # reads nothing more, answers no PING frame of the tunnel

    server, port = await _server(mute)
    channel = H2Channel(f"127.0.0.1:{port}")
    try:
        t = H2ClientTransport(channel, 1 << 20)
        await t.write(b"hi")
        stream = TunnelStream(t, limits=limits(heartbeat_interval=0.1), on_request=unexpected, peer_id="gateway")
        await asyncio.wait_for(stream.run(), 3)
        assert stream.close_reason == "heartbeat_timeout"
        assert isinstance(h2_transport_closed(CallFailed("UNAVAILABLE", "Connection lost")), TransportClosed)
    finally:
        await channel.close()
        await server.stop(0)
