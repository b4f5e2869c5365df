"""Why a tunnel closed, as the log says it (issue 17, item 9): a transport that
ends for a known reason (an oversize message, a keepalive that found a
partition) closes its stream with that reason, logged at warning, not as an
orderly `closed_by_peer` at info. In memory, plus real gRPC calls on
127.0.0.1 for the server's own message limit (in-process, and on a gateway)."""
from __future__ import annotations

import asyncio
import json
import logging

import grpc
import grpc.aio
import pytest

from gateway.tunnel import frames
from gateway.tunnel.errors import TransportClosed
from gateway.tunnel.stream import TunnelStream
from gateway.tunnel.transport import (ClientTransport, grpc_options, open_client_call, transport_closed,
                                      tunnel_handler)
from tests.test_unit_stream import async_test, limits, pipe, request, unexpected


def closed_lines(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.reason) for r in caplog.records if r.getMessage() == "tunnel closed"]


class FailingRead:
    """A transport whose call ends with `error` on the first read."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.written: list[bytes] = []

    async def read(self) -> bytes | None:
        await asyncio.sleep(0)
        raise self.error

    async def write(self, raw: bytes) -> None:
        self.written.append(raw)

    def peer(self) -> str:
        return "peer"

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("reason", ["message_too_large", "heartbeat_timeout"])
def test_a_transport_closed_for_a_reason_closes_the_stream_with_it_at_warning(caplog, reason):
    caplog.set_level(logging.INFO, logger="gateway.tunnel")

    async def scenario() -> None:
        stream = TunnelStream(FailingRead(TransportClosed(reason, "detail")), limits=limits(),
                              on_request=unexpected, peer_id="c1")
        ex = request(stream, "r1")
        await asyncio.wait_for(stream.run(), 2.0)
        assert stream.close_reason == reason
        assert ex.head.exception().code == "tunnel_closed"

    asyncio.run(scenario())
    assert closed_lines(caplog) == [(logging.WARNING, reason)]


def test_a_peer_closing_in_order_is_still_closed_by_peer_at_info(caplog):
    caplog.set_level(logging.INFO, logger="gateway.tunnel")

    async def scenario() -> None:
        ta, tb = pipe()
        stream = TunnelStream(ta, limits=limits(), on_request=unexpected, peer_id="c1")
        run = asyncio.ensure_future(stream.run())
        await tb.close()
        await asyncio.wait_for(run, 2.0)
        assert stream.close_reason == "closed_by_peer"

    asyncio.run(scenario())
    assert closed_lines(caplog) == [(logging.INFO, "closed_by_peer")]


def test_a_heartbeat_timeout_is_logged_at_warning(caplog):
    caplog.set_level(logging.INFO, logger="gateway.tunnel")

    async def scenario() -> None:
        ta, _tb = pipe()  # nobody runs the other end: the peer never answers
        stream = TunnelStream(ta, limits=limits(heartbeat_interval=0.02), on_request=unexpected, peer_id="c1")
        await asyncio.wait_for(stream.run(), 1.0)

    asyncio.run(scenario())
    assert closed_lines(caplog) == [(logging.WARNING, "heartbeat_timeout")]


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class FailedCall:
    """A grpc.aio stream-stream call that has failed with `error`."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        self.error = error

    async def read(self):
        raise self.error

    async def write(self, raw: bytes) -> None:
        raise self.error

    def cancel(self) -> bool:
        return False


@pytest.mark.parametrize("code, details, reason", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "CLIENT: Received message larger than max (5000 vs. 2000)",
     "message_too_large"),
    (grpc.StatusCode.UNAVAILABLE, "keepalive watchdog timeout", "heartbeat_timeout"),
    (grpc.StatusCode.UNAVAILABLE, "ping timeout", "heartbeat_timeout"),
    (grpc.StatusCode.UNAVAILABLE, "Socket closed", "connection_lost"),
])
def test_a_client_stream_whose_call_failed_closes_with_the_reason_grpc_gave(caplog, code, details, reason):
    caplog.set_level(logging.INFO, logger="gateway.tunnel")
    error = rpc_error(code, details)

    async def scenario() -> None:
        transport = ClientTransport(FailedCall(error), "gw:1")
        # The call's own error is what read raises (the client's handshake catches AioRpcError).
        with pytest.raises(grpc.aio.AioRpcError):
            await transport.read()
        stream = TunnelStream(transport, limits=limits(), on_request=unexpected, peer_id="gateway")
        await asyncio.wait_for(stream.run(), 2.0)
        assert stream.close_reason == reason

    asyncio.run(scenario())
    assert closed_lines(caplog) == [(logging.WARNING, reason)]
    assert any(details in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_other_call_failures_stay_transport_errors():
    assert transport_closed(rpc_error(grpc.StatusCode.INTERNAL, "boom")) is None
    # An admission refusal is RESOURCE_EXHAUSTED too, but no message was too large.
    assert transport_closed(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "tunnel admission: retry later")) is None


def test_grpc_keepalive_on_the_tunnel_port_gives_up_after_the_streams_heartbeat():
    """The stream drops a peer silent for 3 heartbeats (checked each interval: at most 4);
    gRPC's keepalive on the server must not end the call first, with a bare EOF."""
    interval_ms = 5000
    opts = dict(grpc_options(3 << 20, interval_ms, server=True))
    assert opts["grpc.keepalive_time_ms"] + opts["grpc.keepalive_timeout_ms"] > 4 * interval_ms


@async_test
async def test_an_oversize_message_to_the_server_closes_its_stream_as_message_too_large():
    """A real gRPC call: the gateway's end checks its message limit itself and names it."""
    limit = 2000
    ended: asyncio.Future[TunnelStream] = asyncio.get_running_loop().create_future()

    async def serve(transport) -> None:
        stream = TunnelStream(transport, limits=limits(), on_request=unexpected, peer_id="c1")
        await stream.run()
        ended.set_result(stream)

    server = grpc.aio.server(options=grpc_options(limit, 5000, server=True))
    server.add_generic_rpc_handlers([tunnel_handler(serve, limit)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(1 << 20, 5000, server=False))
    try:
        call = open_client_call(channel)
        await call.write(b"\0" * (limit + 500))
        stream = await asyncio.wait_for(ended, 2.5)
        assert stream.close_reason == "message_too_large"
    finally:
        await channel.close()
        await server.stop(0)


# -- on a real gateway ------------------------------------------------------------------


def _oversize_calls(port: int, size: int) -> list[grpc.StatusCode]:
    """Two fake clients on the tunnel port: one sends an oversize first message; the other a
    valid HELLO, then (after WELCOME) an oversize message. The codes their calls end with."""
    from gateway.tunnel.transport import CLIENT_MAX_MESSAGE
    from tests.harness import TOKEN

    async def one(hello_first: bool) -> grpc.StatusCode:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                            options=grpc_options(CLIENT_MAX_MESSAGE, 10_000, server=False))
        try:
            call = open_client_call(channel)
            if hello_first:
                await call.write(frames.encode_frame(frames.hello(
                    client_id="big", group="g1", token=TOKEN, version="0", capabilities=["http"],
                    connection_index=0)))
                first = frames.decode_batch(await call.read())
                assert first[0].WhichOneof("kind") == "welcome" and first[0].welcome.accepted, first
            await call.write(b"\0" * size)
            try:
                while await call.read() is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError:
                pass
            return await call.code()
        finally:
            await channel.close()

    async def both():
        return await asyncio.wait_for(asyncio.gather(one(False), one(True)), 20)

    return asyncio.run(both())


def test_an_oversize_message_to_a_gateway_is_logged_as_message_too_large(make_stack):
    stack = make_stack(client=None, settings={"workers": 1})
    codes = _oversize_calls(stack.tunnel_port, 3_500_000)  # over the limit (~3.1 MB here), under gRPC's own
    assert list(codes) == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    lines = [json.loads(x) for x in stack.gateway.output().splitlines() if x.startswith("{")]
    closed = [x for x in lines if x["msg"] == "tunnel closed" and x.get("peer") == "big"]
    assert [(x["level"], x["reason"]) for x in closed] == [("warning", "message_too_large")], closed
    assert any(x["msg"].startswith("tunnel closed before HELLO") and x["reason"] == "message_too_large"
               and x["level"] == "warning" for x in lines)
    assert "closed_by_peer" not in stack.gateway.output() and "Traceback" not in stack.gateway.output()
