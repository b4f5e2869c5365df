"""WebSocket through the tunnel, both directions."""
from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal

import aiohttp
import pytest

from tests.harness import Stack, http, wait_until


@pytest.fixture
def ws_stack(procs, tmp_path) -> Stack:
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    stack.start_gateway()
    stack.start_client("c1")
    return stack


def _ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws"


async def _echo_many(url: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url, max_msg_size=16 << 20, protocols=("echo",)) as ws:
            assert ws.protocol == "echo"
            sent = []

            async def send():
                for i in range(count):
                    size = rng.choice([1, 10, 100, 1000, 4000]) if i % 100 else rng.randint(65536, 1 << 20)
                    if i % 2:
                        data = f"{i}:".encode() + os.urandom(size)
                        sent.append(("b", hashlib.sha256(data).digest()))
                        await ws.send_bytes(data)
                    else:
                        text = f"{i}:" + "t" * size
                        sent.append(("t", hashlib.sha256(text.encode()).digest()))
                        await ws.send_str(text)

            sender = asyncio.ensure_future(send())
            for i in range(count):
                msg = await ws.receive(timeout=30)
                if msg.type == aiohttp.WSMsgType.TEXT:
                    got = ("t", hashlib.sha256(msg.data.encode()).digest())
                else:
                    assert msg.type == aiohttp.WSMsgType.BINARY, msg
                    got = ("b", hashlib.sha256(msg.data).digest())
                await asyncio.sleep(0)
                assert got == sent[i], f"message {i} out of order or changed"
            await sender


def test_ten_thousand_messages_both_ways_in_order(ws_stack):
    asyncio.run(_echo_many(_ws_url(ws_stack.url), 10_000, 1))
    # Egress too: the client's local entry -> gateway -> backend.
    asyncio.run(_echo_many(_ws_url(ws_stack.local_url()), 2_000, 2))
    wait_until(lambda: http("GET", f"{ws_stack.backend_url}/stats").json().get("ws_open") == 0, 5,
               what="sockets closed at the backend")
    ws_stack.wait_idle()


def test_close_codes_travel_both_ways(ws_stack):
    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(_ws_url(ws_stack.url)) as ws:
                await ws.send_str("close:4001:server-bye")
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.CLOSE
                server_close = (msg.data, msg.extra)
            async with s.ws_connect(_ws_url(ws_stack.url)) as ws:
                await ws.send_str("hi")
                assert (await ws.receive(timeout=10)).data == "hi"
                await ws.close(code=4002, message=b"client-bye")
            return server_close

    assert asyncio.run(main()) == (4001, "server-bye")
    wait_until(lambda: 4002 in http("GET", f"{ws_stack.backend_url}/stats").json().get("ws_closes", []), 5,
               what="backend saw the client's close code")
    ws_stack.wait_idle()


def test_hundred_concurrent_sockets(ws_stack):
    async def one(s: aiohttp.ClientSession, i: int) -> None:
        async with s.ws_connect(_ws_url(ws_stack.url)) as ws:
            for j in range(20):
                await ws.send_str(f"{i}-{j}")
                assert (await ws.receive(timeout=20)).data == f"{i}-{j}"
            await ws.ping(b"p")

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as s:
            await asyncio.gather(*(one(s, i) for i in range(100)))

    asyncio.run(main())
    ws_stack.wait_idle()


def test_lost_tunnel_closes_the_socket_with_1011(ws_stack):
    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(_ws_url(ws_stack.url)) as ws:
                await ws.send_str("x")
                assert (await ws.receive(timeout=10)).data == "x"
                ws_stack.clients["c1"][0].popen.send_signal(signal.SIGKILL)
                msg = await ws.receive(timeout=10)
                return msg.type, msg.data

    kind, code = asyncio.run(main())
    assert kind == aiohttp.WSMsgType.CLOSE and code == 1011
