"""Back-pressure between workers (issue 17, item 8): a full ZeroMQ high-water
mark is an overload of the requests in the refused batch (503 `overloaded`),
not the loss of the peer: the channel between the two workers stays open.
LOST stays for a peer the router cannot reach.

Unit level, with real ZeroMQ sockets on ipc paths in the test's folder: the
router's side (a real Broker with a high-water mark of 1 and a worker that
does not read) and the worker's write path (router_link: a DEALER whose queue
takes nothing, so each send raises zmq.Again as a full one does)."""
from __future__ import annotations

import asyncio
import threading
import time

import zmq
import zmq.asyncio

from gateway.router import envelope as env
from gateway.router.broker import Broker
from gateway.tunnel import frames
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.exchange import InboundExchange
from gateway.tunnel.stream import StreamLimits
from gateway.workers.router_link import RouterLink


def _recv(sock: zmq.Socket, timeout: float = 5.0) -> list[bytes] | None:
    return sock.recv_multipart() if sock.poll(int(timeout * 1000)) else None


def test_the_router_answers_a_full_queue_with_full_and_an_unreachable_peer_with_lost(tmp_path):
    endpoint = f"ipc://{tmp_path}/r"
    broker = Broker(endpoint, hwm=1)
    broker.bind()
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    ctx = zmq.Context()
    w0, w1 = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        for sock, ident in ((w0, b"w0"), (w1, b"w1")):
            sock.setsockopt(zmq.ROUTING_ID, ident)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 1)
            sock.connect(endpoint)
        # A peer the router does not know: LOST, as before.
        w1.send_multipart(env.to_router(env.FRAMES, b"w9", b"x"))
        assert _recv(w1) == [env.ROUTER_ID, env.LOST, b"w9"]
        # w1 reads nothing more: batches for it fill the router's queue and its own.
        replies: list[list[bytes]] = []
        payload = b"z" * (256 << 10)
        deadline = time.monotonic() + 20
        while not replies and time.monotonic() < deadline:
            w0.send_multipart(env.to_router(env.FRAMES, b"w1", payload))
            while (msg := _recv(w0, 0.01)) is not None:
                replies.append(msg)
        assert replies, "the router never refused a batch"
        assert all(m[1] == env.FULL for m in replies), [m[:2] for m in replies]
        src, kind, back = env.from_router(replies[0])
        assert (src, kind, back) == (b"w1", env.FULL, payload)  # who was full, and the batch to fail
        assert broker.overloaded >= 1 and broker.unroutable == 1
    finally:
        broker.stop()
        thread.join(5)
        w0.close(0)
        w1.close(0)
        ctx.term()
        broker.destroy()


class _Routing:
    """What RouterLink asks of the worker's routing: its index, channel limits, and
    a handler for requests other workers send (here: they wait until cancelled)."""

    index = 0

    def stream_limits(self, *, channel: bool = False) -> StreamLimits:
        return StreamLimits(heartbeat_interval=0)

    async def serve_remote(self, ex: InboundExchange) -> None:
        await asyncio.Event().wait()


def _open(ch, rid: str):
    return ch.open_request(rid, f"t-{rid}", method="GET", path="/", scheme="http", authority="x", headers=[],
                           end_stream=True, timeout_ms=1000)


def test_a_full_queue_fails_only_the_requests_in_the_batch_and_keeps_the_channel(tmp_path):
    async def scenario() -> None:
        link = RouterLink(_Routing(), f"ipc://{tmp_path}/nobody", report=dict, on_command=lambda _c: 0)
        ctx = zmq.asyncio.Context()
        link.sock = ctx.socket(zmq.DEALER)
        link.sock.setsockopt(zmq.LINGER, 0)
        link.sock.setsockopt(zmq.IMMEDIATE, 1)  # no queue before a connection...
        link.sock.connect(link.endpoint)  # ...and nothing listens: every send raises zmq.Again
        try:
            ch = link.channel(b"w1")
            for rid in ("r1", "r2"):
                ex = _open(ch, rid)
                try:
                    await asyncio.wait_for(ex.head, 2)
                    raise AssertionError("a refused batch answered")
                except TunnelError as exc:
                    assert exc.code == "overloaded" and exc.status == 503, exc
                assert not ch.closed and link.channels.get(b"w1") is ch  # the channel stays
                assert rid not in ch.pending
            assert link.overloaded >= 2

            # A request w1 sent us, whose answer the router could not queue (FULL back to us).
            ch.feed(frames.encode_head("q1", "t-q1", frames.request_headers(
                method="GET", path="/", scheme="http", authority="x", headers=[], end_stream=True, timeout_ms=1000),
                reply=False))
            inbound = ch.serving["q1"]
            answer = frames.encode_head("q1", "t-q1", frames.response_headers(
                status=200, reason="OK", headers=[], end_stream=False), reply=True)
            link.undelivered(b"w1", answer)
            await asyncio.wait_for(asyncio.gather(inbound.task, return_exceptions=True), 2)
            assert "q1" not in ch.serving and not ch.closed

            # A lost peer still closes the channel: its requests fail tunnel_closed.
            link.lose(b"w1", "worker_lost")
            assert b"w1" not in link.channels
        finally:
            for c in list(link.channels.values()):
                c.close("test over")
            await asyncio.sleep(0)
            link.sock.close(0)
            ctx.term()

    asyncio.run(asyncio.wait_for(scenario(), 10))
