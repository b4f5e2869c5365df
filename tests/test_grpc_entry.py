"""gRPC through the gateway's gRPC entry and a tunnel client to a grpc.aio server."""
from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tests.harness import TOKEN, Stack, free_port, wait_until

HERE = Path(__file__).resolve().parent / "grpc_echo"


@pytest.fixture(scope="module")
def echo_gen(tmp_path_factory):
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("echo_gen")
    assert protoc.main(["protoc", f"-I{HERE}", f"--python_out={out}", f"--grpc_python_out={out}",
                        str(HERE / "echo.proto")]) == 0
    sys.path.insert(0, str(out))
    yield out, importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")
    sys.path.remove(str(out))


@pytest.fixture
def grpc_stack(procs, make_stack, echo_gen) -> Stack:
    gen, pb, _ = echo_gen
    port = free_port()
    echo = procs.start("grpc-echo", [sys.executable, str(HERE / "server.py"), str(gen), str(port)])

    async def up() -> bool:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await asyncio.wait_for(ch.channel_ready(), 1)
            return True

    wait_until(lambda: asyncio.run(up()), 15, what="grpc echo server", watch=echo)

    def echo_routes(stack: Stack, doc: dict) -> None:
        doc["groups"] = {"g1": {"tokens": [TOKEN],
                                "upstreams": {"grpc": {"servers": [f"http://127.0.0.1:{port}"]},
                                              "web": {"servers": [stack.backend_url]}},
                                "rules": [{"path_prefix": "/echo.v1.Echo", "upstream": "grpc"},
                                          {"path_prefix": "/", "upstream": "web"}]}}
        doc["grpc_routes"] = [{"match_service": "echo.", "group": "g1", "timeout": 10.0}]

    stack = make_stack(edit=echo_routes)
    stack.echo_port = port
    stack.echo = echo
    return stack


def _stub(stack: Stack, gen):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}")
    return channel, gen[2].EchoStub(channel)


def test_all_four_call_kinds_with_metadata_and_trailers(grpc_stack, echo_gen):
    pb = echo_gen[1]

    async def main():
        channel, stub = _stub(grpc_stack, echo_gen)
        async with channel:
            call = stub.Unary(pb.Msg(text="hi"), metadata=(("x-caller", "me"), ("x-blob-bin", b"\x01\x02")))
            assert (await call).text == "hi"
            assert dict(await call.initial_metadata())["srv-init"] == "1"
            trailing = dict(await call.trailing_metadata())
            assert trailing["srv-trail"] == "t-hi" and trailing["x-caller"] == "me"
            assert trailing["srv-bin-bin"] == b"\x00\x01\xff"
            assert await call.code() == grpc.StatusCode.OK

            got = [m.text async for m in stub.ServerStream(pb.Msg(text="s", count=5))]
            assert got == [f"s-{i}" for i in range(5)]

            async def gen():
                for t in "abcde":
                    yield pb.Msg(text=t)

            res = await stub.ClientStream(gen())
            assert (res.text, res.count) == ("abcde", 5)

            bidi = stub.Bidi()
            for i in range(20):
                await bidi.write(pb.Msg(text=f"m{i}", count=i))
                reply = await bidi.read()
                assert (reply.text, reply.count) == (f"M{i}", i)  # one by one, not collected
            await bidi.done_writing()
            assert await bidi.read() is grpc.aio.EOF

    asyncio.run(main())
    grpc_stack.wait_idle()


# Room for the call to reach the upstream first (through the gateway's entry and worker,
# the tunnel and the client: with 0.5 s a loaded 2-core machine could miss it).
DEADLINE = 3.0


def _upstream_stats(stack: Stack, pb) -> dict:
    """What the echo server saw (server.py's STATS), asked directly."""

    async def ask() -> dict:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.echo_port}") as direct:
            stats = direct.unary_unary("/echo.v1.Echo/Stats", request_serializer=pb.Msg.SerializeToString,
                                       response_deserializer=pb.Msg.FromString)
            return json.loads((await stats(pb.Msg(), timeout=5)).text)

    return asyncio.run(ask())


def test_status_details_deadline_and_cancel(grpc_stack, echo_gen):
    pb = echo_gen[1]

    async def main():
        channel, stub = _stub(grpc_stack, echo_gen)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Unary(pb.Msg(text="x", fail="no such thing"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details() == "no such thing"
            assert dict(err.value.trailing_metadata())["srv-trail"] == "t-x"
            # The caller's deadline reaches the upstream, which runs out of it: the call ends
            # at the deadline, long before the upstream would answer.
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Unary(pb.Msg(text="slow", delay_ms=int((DEADLINE + 30) * 1000)), timeout=DEADLINE)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < DEADLINE + 5
            # A cancel by the caller reaches the upstream.
            call = stub.ServerStream(pb.Msg(text="c", count=100, delay_ms=100))
            assert (await call.read()).text == "c-0"
            call.cancel()
            await asyncio.sleep(0.1)

    asyncio.run(main())
    # Both end cancelled at the upstream, the deadline-expired call and the cancelled stream;
    # the news may come after the callers' errors: wait for it.
    seen: dict = {}

    def both_cancelled() -> bool:
        seen.update(_upstream_stats(grpc_stack, pb))
        return {"slow", "c"} <= set(seen["cancelled"])

    try:
        wait_until(both_cancelled, 10, what="both calls cancelled at the upstream", watch=grpc_stack.echo)
    except TimeoutError:
        pytest.fail(f"the upstream saw these calls cancelled: {seen.get('cancelled')}; deadlines: {seen.get('deadlines')}")
    # It got the caller's deadline (what was left of it, give or take gRPC's rounding of
    # grpc-timeout), not none or the route's 10 s.
    assert 0 < seen["deadlines"]["slow"] < DEADLINE + 1, seen
    grpc_stack.wait_idle()


def test_unrouted_service_and_lost_client(grpc_stack, echo_gen):
    pb = echo_gen[1]

    async def main():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_stack.grpc_port}") as ch:
            other = ch.unary_unary("/other.Svc/M")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await other(b"")
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            stub = _stub(grpc_stack, echo_gen)[1]
            call = stub.ServerStream(pb.Msg(text="l", count=100, delay_ms=100))
            assert (await call.read()).text == "l-0"
            grpc_stack.clients["c1"][0].kill()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_plain_requests_stay_fast_beside_a_slow_grpc_stream_and_a_busy_websocket(grpc_stack, echo_gen):
    import statistics

    import aiohttp

    pb = echo_gen[1]

    async def plain_latencies(s: aiohttp.ClientSession, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.monotonic()
            async with s.get(f"{grpc_stack.url}/hello") as r:
                await r.read()
                assert r.status == 200
            out.append(time.monotonic() - t0)
        return out

    async def main():
        async with aiohttp.ClientSession() as s:
            await plain_latencies(s, 20)  # warm up
            alone = statistics.median(await plain_latencies(s, 100))
            stop = asyncio.Event()

            async def slow_grpc():
                channel, stub = _stub(grpc_stack, echo_gen)
                async with channel:
                    async for _ in stub.ServerStream(pb.Msg(text="g", count=1000, delay_ms=20)):
                        if stop.is_set():
                            break

            async def busy_websocket():
                async with s.ws_connect(grpc_stack.url.replace("http://", "ws://") + "/ws") as ws:
                    blob = b"w" * 65536
                    while not stop.is_set():  # busy, paced: ~6 MB/s each way
                        await ws.send_bytes(blob)
                        await ws.receive(timeout=10)
                        await asyncio.sleep(0.01)

            background = [asyncio.ensure_future(slow_grpc()), asyncio.ensure_future(busy_websocket())]
            await asyncio.sleep(0.5)
            busy = statistics.median(await plain_latencies(s, 100))
            stop.set()
            await asyncio.gather(*background, return_exceptions=True)
            return alone, busy

    alone, busy = asyncio.run(main())
    print(f"plain request median: {alone * 1000:.2f} ms alone, {busy * 1000:.2f} ms beside gRPC + WebSocket")
    # Within 2x, with a 3 ms floor: at ~1 ms medians on a loaded 2-core machine (seven processes
    # on two cores) that much is scheduling noise; head-of-line blocking would cost tens of ms.
    assert busy <= max(2 * alone, alone + 0.003), f"plain median {alone*1000:.1f} ms alone, {busy*1000:.1f} ms busy"


def test_an_unreachable_upstream_is_unavailable_without_its_address(grpc_stack, echo_gen):
    """gRPC's own text for an unreachable upstream names its address: the client's log keeps
    it (with the request id), the caller's details never show it."""
    pb = echo_gen[1]
    grpc_stack.echo.kill()

    async def main() -> grpc.aio.AioRpcError:
        channel, stub = _stub(grpc_stack, echo_gen)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Unary(pb.Msg(text="hi"), timeout=15)
            return err.value

    err = asyncio.run(main())
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert str(grpc_stack.echo_port) not in err.details() and "127.0.0.1" not in err.details(), err.details()
    wait_until(lambda: f"127.0.0.1:{grpc_stack.echo_port}" in grpc_stack.clients["c1"][0].output(),
               what="the upstream's address in the client's log")
