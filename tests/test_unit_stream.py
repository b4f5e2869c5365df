"""Unit tests of one tunnel stream (gateway/tunnel/stream.py, exchange.py, body.py):
two TunnelStreams joined by an in-memory transport, each end with its own
request handler. No sockets, no processes; no wall-clock waits except where the
behaviour under test is a timeout (idle body, heartbeat, GOAWAY grace).

Each test ends with nothing in flight on either end (`Pair.__aexit__`): every
exchange was answered, reset or closed, and no handler task is left running."""
from __future__ import annotations

import asyncio
import logging
import functools
from typing import Awaitable, Callable

import pytest

from gateway.tunnel import frames
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.exchange import InboundExchange, OutboundExchange
from gateway.tunnel.stream import StreamLimits, TunnelStream

GUARD = 3.0  # a test that hangs fails after this long instead of hanging the suite


def async_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def run(*args, **kwargs) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), GUARD))
    return run


# -- an in-memory transport -------------------------------------------------------------


class End:
    """One end of an in-memory transport pair: what one end writes the other reads.
    Closing either end delivers None (EOF) to both readers; a write after that is dropped,
    as a finished gRPC call would. Every batch written is decoded into `frames` so tests can
    look at what went over the wire; `flowing` cleared holds writes (a peer not reading)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.other: End = self
        self.closed = False
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.frames: list[frames.Frame | frames.DataFrame] = []
        self.moves = 0  # batches written and read: activity, for settle()

    async def read(self) -> bytes | None:
        raw = await self.inbox.get()
        self.moves += 1
        return raw

    async def write(self, raw: bytes) -> None:
        await self.flowing.wait()
        if self.closed:
            return
        self.moves += 1
        self.frames.extend(frames.decode_frames(raw))
        self.other.inbox.put_nowait(raw)

    def peer(self) -> str:
        return self.other.name

    async def close(self) -> None:
        if not self.closed:
            self.closed = self.other.closed = True
            self.inbox.put_nowait(None)
            self.other.inbox.put_nowait(None)

    # What this end sent.
    def sent(self, kind: str, *, reply: bool | None = None) -> list:
        return [f for f in self.frames if kind_of(f) == kind and (reply is None or f.reply == reply)]


def kind_of(f: frames.Frame | frames.DataFrame) -> str:
    return "data" if isinstance(f, frames.DataFrame) else f.WhichOneof("kind")


def pipe() -> tuple[End, End]:
    a, b = End("a"), End("b")
    a.other, b.other = b, a
    return a, b


async def settle(*ends: End, quiet: int = 10) -> None:
    """Run loop turns until no batch has moved for `quiet` turns in a row: everything
    the streams could do without a timer firing or the test acting is done."""
    last, still = -1, 0
    for _ in range(20_000):
        moves = sum(e.moves for e in ends)
        still = still + 1 if moves == last else 0
        if still >= quiet:
            return
        last = moves
        await asyncio.sleep(0)
    raise AssertionError("the streams never went quiet")


async def until(predicate: Callable[[], bool], timeout: float = 1.0, poll: float = 0.0) -> None:
    """Wait for `predicate` (loop turns; `poll` seconds apart when waiting on a timer)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(poll)


async def unexpected(ex: InboundExchange) -> None:
    raise AssertionError(f"no request expected on this end, got {ex.request_id}")


def limits(**kw) -> StreamLimits:
    kw.setdefault("heartbeat_interval", 0)  # no PINGs unless a test is about them
    return StreamLimits(**kw)


class Pair:
    """Streams `a` and `b` over one in-memory transport, both running. On a clean exit the test
    must have left nothing in flight: pending and serving empty on both ends while they still
    run, then both are closed and every handler task has ended."""

    def __init__(self, *, a_handler=unexpected, b_handler=unexpected, a_limits: StreamLimits | None = None,
                 b_limits: StreamLimits | None = None) -> None:
        self.ta, self.tb = pipe()
        self.handler_tasks: list[asyncio.Task] = []
        self.a = TunnelStream(self.ta, limits=a_limits or limits(), on_request=self._tracked(a_handler), peer_id="b")
        self.b = TunnelStream(self.tb, limits=b_limits or limits(), on_request=self._tracked(b_handler), peer_id="a")
        self.runs: list[asyncio.Task] = []

    def _tracked(self, handler):
        async def serve(ex: InboundExchange) -> None:
            self.handler_tasks.append(asyncio.current_task())
            await handler(ex)
        return serve

    async def _run(self, stream: TunnelStream) -> None:
        try:
            await stream.run()
        finally:
            await stream.transport.close()  # the call ends with its stream: the peer reads EOF

    async def __aenter__(self) -> "Pair":
        loop = asyncio.get_running_loop()
        self.runs = [loop.create_task(self._run(self.a)), loop.create_task(self._run(self.b))]
        return self

    def assert_idle(self) -> None:
        tables = {"a.pending": self.a.pending, "a.serving": self.a.serving,
                  "b.pending": self.b.pending, "b.serving": self.b.serving}
        assert all(not t for t in tables.values()), tables

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                await settle(self.ta, self.tb)
                self.assert_idle()
        finally:
            self.a.close("test over")
            self.b.close("test over")
            done, _ = await asyncio.wait(self.runs, timeout=1.0)
        if exc_type is None:
            assert len(done) == 2, "a stream did not stop"
            for t in done:
                t.result()
            self.assert_idle()
            assert all(t.done() for t in self.handler_tasks), "a handler task outlived its stream"


def request(stream: TunnelStream, rid: str, *, end_stream: bool = True, path: str = "/",
            headers: list[tuple[str, str]] | None = None) -> OutboundExchange:
    return stream.open_request(rid, f"trace-{rid}", method="POST" if not end_stream else "GET", path=path,
                               scheme="http", authority="test", headers=headers or [], end_stream=end_stream,
                               timeout_ms=1000)


async def read_all(body) -> bytes:
    return b"".join([chunk async for chunk in body.iter_chunks()])


async def respond(ex: InboundExchange, body: bytes, status: int = 200) -> None:
    ex.respond(status, "OK", [("x-request-id", ex.request_id)], end_stream=not body)
    if body:
        await ex.sender.write(body, end=True)


def pattern(seed: int, size: int) -> bytes:
    """A body whose every byte says where it belongs: chunks out of order or lost show."""
    return bytes((seed * 31 + i * 7 + i // 251) % 256 for i in range(size))


def code_of(fut: asyncio.Future) -> str:
    exc = fut.exception()
    assert isinstance(exc, TunnelError), exc
    return exc.code


# -- ordering ---------------------------------------------------------------------------


@async_test
async def test_concurrent_requests_answered_out_of_order_match_by_request_id():
    n = 40
    gates: dict[str, asyncio.Future] = {}
    arrived: dict[str, list[bytes]] = {}
    all_in = asyncio.Event()

    async def serve(ex: InboundExchange) -> None:
        chunks = [chunk async for chunk in ex.body.iter_chunks()]
        arrived[ex.request_id] = chunks
        gates[ex.request_id] = gate = asyncio.get_running_loop().create_future()
        if len(gates) == n:
            all_in.set()
        await gate
        await respond(ex, ex.request_id.encode() + b"|" + b"".join(chunks))

    async def call(i: int) -> tuple[frames.pb.Headers, bytes]:
        rid = f"r{i}"
        body = pattern(i, 1000)
        ex = request(p.a, rid, end_stream=False, path=f"/p{i}")
        for at in range(0, len(body), 100):  # several writes, each split into chunk_size frames
            await ex.sender.write(body[at:at + 100])
        ex.sender.end()
        head = await ex.head
        got = await read_all(ex.body)
        ex.close()
        return head, got

    # A small window and chunk size: many frames of many requests interleave and wait for credit.
    small = dict(window=64, chunk_size=16)
    async with Pair(b_handler=serve, a_limits=limits(**small), b_limits=limits(**small)) as p:
        calls = asyncio.gather(*(call(i) for i in range(n)))
        await all_in.wait()
        order = [f"r{i}" for i in range(n)]
        order = order[1::2][::-1] + order[::2]  # odd ones backwards, then the even ones
        for rid in order:
            gates[rid].set_result(None)
            await settle(p.ta, p.tb)  # this answer is on the wire before the next starts
        results = await calls

        # Heads went out in the order answered, yet each landed on its own request.
        assert [f.request_id for f in p.tb.sent("headers", reply=True)] == order
        for i, (head, got) in enumerate(results):
            rid = f"r{i}"
            assert head.status == 200 and ("x-request-id", rid) in frames.header_list(head)
            assert got == rid.encode() + b"|" + pattern(i, 1000)
            # The request body arrived whole, in order, in frames of at most chunk_size.
            assert b"".join(arrived[rid]) == pattern(i, 1000)
            assert len(arrived[rid]) >= 1000 // 16 and max(map(len, arrived[rid])) <= 16
        assert p.a.unknown_frames == p.b.unknown_frames == 0
        assert p.a.requests_originated == p.b.requests_served == n


@async_test
async def test_both_ends_originate_requests_on_one_stream():
    def echo(tag: bytes):
        async def serve(ex: InboundExchange) -> None:
            await respond(ex, tag + await read_all(ex.body))
        return serve

    async def call(stream: TunnelStream, rid: str, body: bytes) -> bytes:
        ex = request(stream, rid, end_stream=False)
        await ex.sender.write(body, end=True)
        assert (await ex.head).status == 200
        got = await read_all(ex.body)
        ex.close()
        return got

    async with Pair(a_handler=echo(b"a:"), b_handler=echo(b"b:")) as p:
        # The same request ids both ways: each end keeps its own requests apart from its peer's.
        got = await asyncio.gather(*(call(p.a, f"r{i}", b"to-b-%d" % i) for i in range(5)),
                                   *(call(p.b, f"r{i}", b"to-a-%d" % i) for i in range(5)))
        assert got == [b"b:to-b-%d" % i for i in range(5)] + [b"a:to-a-%d" % i for i in range(5)]


# -- flow control -----------------------------------------------------------------------


async def read_window_by_window(p: "Pair", sender, reader, reader_end: End, writer: asyncio.Task,
                                 body: bytes) -> None:
    """With a 1000-byte window and 100-byte chunks: the sender stops after a window's
    worth; reading 400 bytes grants nothing yet (credit goes back in half windows),
    reading the fifth chunk grants 500 and the sender goes on to 1500; then the rest."""
    await settle(p.ta, p.tb)
    assert sender.bytes_sent == 1000 and not writer.done()  # a window's worth, then it waits
    got = [await reader.read() for _ in range(4)]
    await settle(p.ta, p.tb)
    assert sender.bytes_sent == 1000 and not writer.done() and not reader_end.sent("window")
    got.append(await reader.read())
    await settle(p.ta, p.tb)
    assert sender.bytes_sent == 1500 and not writer.done()
    assert [f.window.increment for f in reader_end.sent("window")] == [500]
    got.append(await read_all(reader))
    assert b"".join(got) == body


@async_test
async def test_a_request_body_larger_than_the_window_waits_for_the_reader():
    served: asyncio.Future[InboundExchange] = asyncio.get_running_loop().create_future()
    answer = asyncio.Event()

    async def serve(ex: InboundExchange) -> None:
        served.set_result(ex)
        await answer.wait()
        await respond(ex, b"")

    window = dict(window=1000, chunk_size=100)
    async with Pair(b_handler=serve, a_limits=limits(**window), b_limits=limits(**window)) as p:
        ex = request(p.a, "r1", end_stream=False)
        inbound = await served
        body = pattern(1, 3000)
        writing = asyncio.get_running_loop().create_task(ex.sender.write(body, end=True))
        await read_window_by_window(p, ex.sender, inbound.body, p.tb, writing, body)
        await writing
        answer.set()
        assert (await ex.head).status == 200 and ex.body.at_eof
        ex.close()


@async_test
async def test_a_response_body_larger_than_the_window_waits_for_the_reader():
    served: asyncio.Future[InboundExchange] = asyncio.get_running_loop().create_future()
    body = pattern(2, 3000)

    async def serve(ex: InboundExchange) -> None:
        served.set_result(ex)
        await respond(ex, body)

    window = dict(window=1000, chunk_size=100)
    async with Pair(b_handler=serve, a_limits=limits(**window), b_limits=limits(**window)) as p:
        ex = request(p.a, "r1")
        inbound = await served
        await ex.head
        handler = p.handler_tasks[0]
        await read_window_by_window(p, inbound.sender, ex.body, p.ta, handler, body)
        await handler
        ex.close()


@async_test
async def test_request_data_past_the_window_resets_that_exchange_only():
    served: asyncio.Future[InboundExchange] = asyncio.get_running_loop().create_future()
    cancelled = asyncio.Event()

    async def serve(ex: InboundExchange) -> None:
        if ex.head.path == "/after":
            await respond(ex, b"still serving")
            return
        served.set_result(ex)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with Pair(b_handler=serve, a_limits=limits(window=100), b_limits=limits(window=100)) as p:
        ex = request(p.a, "r1", end_stream=False)
        await served
        # The peer's writer would never do this: DATA frames straight onto the wire, past the credit.
        await p.ta.write(frames.encode_frame(frames.data("r1", "trace-r1", b"x" * 100, end_stream=False, reply=False)))
        await settle(p.ta, p.tb)
        assert not ex.head.done() and "r1" in p.b.serving  # exactly the window: accepted
        await p.ta.write(frames.encode_frame(frames.data("r1", "trace-r1", b"x", end_stream=False, reply=False)))
        with pytest.raises(TunnelError) as info:
            await ex.head
        assert info.value.code == "protocol_error"
        await cancelled.wait()
        assert [(f.request_id, f.reset.code) for f in p.tb.sent("reset")] == [("r1", "protocol_error")]
        assert "r1" not in p.a.pending and "r1" not in p.b.serving

        after = request(p.a, "r2", path="/after")
        assert await read_all(after.body) == b"still serving"
        after.close()
        assert not p.a.closed and not p.b.closed


@async_test
async def test_response_data_past_the_window_fails_that_exchange_only():
    cancelled = asyncio.Event()

    async def serve(ex: InboundExchange) -> None:
        if ex.head.path == "/after":
            await respond(ex, b"still serving")
            return
        ex.respond(200, "OK", [], end_stream=False)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with Pair(b_handler=serve, a_limits=limits(window=100), b_limits=limits(window=100)) as p:
        ex = request(p.a, "r1")
        assert (await ex.head).status == 200
        await p.tb.write(frames.encode_frame(frames.data("r1", "trace-r1", b"y" * 100, end_stream=False, reply=True)))
        await p.tb.write(frames.encode_frame(frames.data("r1", "trace-r1", b"y", end_stream=False, reply=True)))
        with pytest.raises(TunnelError) as info:
            await read_all(ex.body)
        assert info.value.code == "protocol_error"
        # The originator tells the serving end to stop: its handler is cancelled.
        await cancelled.wait()
        # ... with the real reason: protocol_error, not cancelled.
        assert [(f.request_id, f.reset.code) for f in p.ta.sent("reset")] == [("r1", "protocol_error")]
        assert "r1" not in p.a.pending and "r1" not in p.b.serving

        after = request(p.a, "r2", path="/after")
        assert await read_all(after.body) == b"still serving"
        after.close()


# -- RESET ------------------------------------------------------------------------------


@async_test
async def test_the_originator_closing_an_exchange_cancels_the_handler():
    started = asyncio.Event()
    seen: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()

    async def serve(ex: InboundExchange) -> None:
        started.set()
        try:
            await ex.body.read()
        except asyncio.CancelledError:
            try:
                await ex.body.read()  # what the RESET said
            except TunnelError as exc:
                seen.set_result((exc.code, exc.message))
            raise

    async with Pair(b_handler=serve) as p:
        ex = request(p.a, "r1", end_stream=False)
        await started.wait()
        ex.close("timeout", "gave up waiting")
        assert "r1" not in p.a.pending  # forgotten at once
        assert code_of(ex.head) == "timeout"
        with pytest.raises(TunnelError):
            await ex.sender.write(b"late")
        assert await seen == ("timeout", "gave up waiting")
        await settle(p.ta, p.tb)
        assert "r1" not in p.b.serving and p.handler_tasks[0].done()
        assert [(f.reply, f.reset.code) for f in p.ta.sent("reset")] == [(False, "timeout")]
        ex.close()  # a second close sends nothing
        await settle(p.ta, p.tb)
        assert len(p.ta.sent("reset")) == 1


@async_test
async def test_the_serving_end_resetting_fails_the_originators_head_and_body():
    async def serve(ex: InboundExchange) -> None:
        if ex.head.path == "/refuse":
            ex.reset("upstream_unavailable", "connection refused")
            return
        ex.respond(200, "OK", [], end_stream=False)
        await ex.sender.write(b"partial")
        ex.reset("upstream_timeout", "upstream went quiet")

    async with Pair(b_handler=serve) as p:
        refused = request(p.a, "r1", path="/refuse")
        with pytest.raises(TunnelError) as info:
            await refused.head
        assert (info.value.code, info.value.message) == ("upstream_unavailable", "connection refused")
        with pytest.raises(TunnelError, match="upstream_unavailable"):
            await refused.body.read()

        cut = request(p.a, "r2", path="/cut")
        assert (await cut.head).status == 200
        assert await cut.body.read() == b"partial"  # what came before the RESET is still read
        with pytest.raises(TunnelError) as info:
            await cut.body.read()
        assert info.value.code == "upstream_timeout"
        assert "r1" not in p.a.pending and "r2" not in p.a.pending
        assert [(f.reply, f.reset.code) for f in p.tb.sent("reset")] == [
            (True, "upstream_unavailable"), (True, "upstream_timeout")]
        assert not p.ta.sent("reset")  # the originator needs to say nothing back


# -- overload ---------------------------------------------------------------------------


@async_test
async def test_open_request_at_max_inflight_is_overloaded():
    gates: dict[str, asyncio.Future] = {}

    async def serve(ex: InboundExchange) -> None:
        gates[ex.request_id] = gate = asyncio.get_running_loop().create_future()
        await gate
        await respond(ex, b"ok")

    async with Pair(b_handler=serve, a_limits=limits(max_inflight=2)) as p:
        first, second = request(p.a, "r1"), request(p.a, "r2")
        with pytest.raises(TunnelError) as info:
            request(p.a, "r3")
        assert info.value.code == "overloaded" and info.value.status == 503
        assert set(p.a.pending) == {"r1", "r2"} and p.a.requests_originated == 2
        await until(lambda: len(gates) == 2)
        assert len(p.ta.sent("headers")) == 2  # nothing of the refused one went out

        gates["r1"].set_result(None)
        assert await read_all(first.body) == b"ok"
        first.close()
        third = request(p.a, "r3")  # room again
        await until(lambda: "r3" in gates)
        for rid in ("r2", "r3"):
            gates[rid].set_result(None)
        for ex in (second, third):
            assert await read_all(ex.body) == b"ok"
            ex.close()


@async_test
async def test_the_serving_end_at_its_inflight_limit_resets_overloaded():
    gate = asyncio.Event()

    async def serve(ex: InboundExchange) -> None:
        await gate.wait()
        await respond(ex, b"ok")

    async with Pair(b_handler=serve, b_limits=limits(max_inflight=1)) as p:
        first = request(p.a, "r1")
        await until(lambda: "r1" in p.b.serving)
        second = request(p.a, "r2")  # the originator has room; the serving end has none
        with pytest.raises(TunnelError) as info:
            await second.head
        assert info.value.code == "overloaded"
        assert "r2" not in p.a.pending and p.b.requests_served == 1
        assert [(f.request_id, f.reset.code) for f in p.tb.sent("reset")] == [("r2", "overloaded")]

        gate.set()
        assert await read_all(first.body) == b"ok"
        first.close()
        third = request(p.a, "r3")
        assert await read_all(third.body) == b"ok"
        third.close()


@async_test
async def test_bodies_wait_at_half_the_outbound_queue_and_a_full_queue_refuses_requests():
    async def serve(ex: InboundExchange) -> None:
        await respond(ex, b"%d" % len(await read_all(ex.body)))

    async with Pair(b_handler=serve, a_limits=limits(max_queue_bytes=1000, chunk_size=200)) as p:
        p.ta.flowing.clear()  # the transport takes no more: the peer is not reading
        ex = request(p.a, "r1", end_stream=False)
        await settle(p.ta, p.tb)  # the writer took the head and waits on the transport
        body = pattern(3, 2000)
        writing = asyncio.get_running_loop().create_task(ex.sender.write(body, end=True))
        await settle(p.ta, p.tb)
        # The body writer waits once bodies fill half the queue; the stream still takes
        # requests (bodies in flight, up to a window each, never refuse one by themselves).
        assert not writing.done() and not p.a.queue_full
        heads = []
        while not p.a.queue_full:  # heads and control fill the other half
            heads.append(request(p.a, f"h{len(heads)}"))
            assert len(heads) < 50
        assert len(heads) >= 2
        with pytest.raises(TunnelError) as info:
            request(p.a, "refused")
        assert info.value.code == "overloaded"
        assert set(p.a.pending) == {"r1"} | {h.request_id for h in heads}

        p.ta.flowing.set()  # the writer drains the queue
        await writing
        assert not p.a.queue_full
        assert await read_all(ex.body) == b"2000"
        ex.close()
        for head in heads:
            assert await read_all(head.body) == b"0"
            head.close()
        second = request(p.a, "r2")
        assert await read_all(second.body) == b"0"
        second.close()


# -- timeouts ---------------------------------------------------------------------------


@async_test
async def test_a_body_read_with_idle_times_out():
    caught: list[tuple[bytes | None, str]] = []

    async def serve(ex: InboundExchange) -> None:
        first = await ex.body.read(idle=0.2)
        try:
            await ex.body.read(idle=0.05)
        except TunnelError as exc:
            caught.append((first, exc.code))
            raise  # the stream answers with a RESET of the same code

    async with Pair(b_handler=serve) as p:
        ex = request(p.a, "r1", end_stream=False)
        await ex.sender.write(b"some")  # ...and then nothing more
        with pytest.raises(TunnelError) as info:
            await ex.head
        assert info.value.code == "timeout"
        assert caught == [(b"some", "timeout")]
        assert [f.reset.code for f in p.tb.sent("reset")] == ["timeout"]


@async_test
async def test_a_heartbeat_timeout_closes_a_stream_whose_peer_stays_silent():
    ta, tb = pipe()  # nobody runs tb: the peer never answers
    stream = TunnelStream(ta, limits=limits(heartbeat_interval=0.02), on_request=unexpected, peer_id="b")
    ex = request(stream, "r1")
    await asyncio.wait_for(stream.run(), 1.0)
    assert stream.close_reason == "heartbeat_timeout" and stream.closed
    assert len(ta.sent("ping")) >= 2  # it pinged before giving up
    assert code_of(ex.head) == "tunnel_closed" and not stream.pending


@async_test
async def test_a_peer_answering_pings_keeps_the_stream_open():
    async with Pair(a_limits=limits(heartbeat_interval=0.04)) as p:
        # Five PINGs span more than 3 intervals: without the answers `a` would have closed.
        await until(lambda: len(p.ta.sent("ping")) >= 5, timeout=1.5, poll=0.005)
        assert not p.a.closed and p.a.close_reason == ""
        assert all(f.ping.ack for f in p.tb.sent("ping")) and len(p.tb.sent("ping")) >= 4


# -- GOAWAY and closing -----------------------------------------------------------------


@async_test
async def test_goaway_refuses_new_requests_lets_inflight_ones_finish_then_closes():
    gate = asyncio.Event()

    async def serve(ex: InboundExchange) -> None:
        await gate.wait()
        await respond(ex, b"finished")

    async with Pair(b_handler=serve) as p:
        inflight = request(p.a, "r1")
        await until(lambda: "r1" in p.b.serving)
        p.ta.flowing.clear()
        crossing = request(p.a, "r2")  # sent before `a` hears of the GOAWAY, arrives after it
        leaving = asyncio.get_running_loop().create_task(p.b.goaway("shutdown", grace=1.0))
        await until(lambda: p.a.draining)
        with pytest.raises(TunnelError) as info:
            request(p.a, "r3")
        assert info.value.code == "tunnel_closed"
        with pytest.raises(TunnelError, match="tunnel_closed"):
            request(p.b, "b1")  # the end leaving takes none either

        p.ta.flowing.set()
        with pytest.raises(TunnelError) as info:
            await crossing.head
        assert info.value.code == "tunnel_closed"
        await settle(p.ta, p.tb)
        assert not leaving.done() and not p.b.closed and "r1" in p.b.serving  # waits for r1

        gate.set()
        assert await read_all(inflight.body) == b"finished"
        inflight.close()
        await asyncio.wait_for(leaving, 1.0)
        await asyncio.wait_for(asyncio.gather(*p.runs), 1.0)
        assert p.b.close_reason == "shutdown" and p.a.closed and p.b.closed
        assert p.a.close_reason in ("drained", "closed_by_peer")
        assert [f.goaway.reason for f in p.tb.sent("goaway")] == ["shutdown"]
        assert [(f.request_id, f.reset.code) for f in p.tb.sent("reset")] == [("r2", "tunnel_closed")]


@async_test
async def test_requests_still_pending_when_the_grace_ends_fail_tunnel_closed():
    cancelled: list[str] = []

    async def hold(ex: InboundExchange) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(ex.request_id)
            raise

    async with Pair(a_handler=hold, b_handler=hold) as p:
        to_b = request(p.a, "r1", end_stream=False)
        to_a = request(p.b, "b1")
        await until(lambda: "r1" in p.b.serving and "b1" in p.a.serving)
        await p.b.goaway("shutdown", grace=0.1)
        await asyncio.wait_for(asyncio.gather(*p.runs), 1.0)
        # Both ends closed: each one's own requests failed, each one's handlers cancelled.
        for ex in (to_b, to_a):
            assert code_of(ex.head) == "tunnel_closed"
            with pytest.raises(TunnelError, match="tunnel_closed"):
                await ex.body.read()
        with pytest.raises(TunnelError, match="tunnel_closed"):
            await to_b.sender.write(b"late")
        assert sorted(cancelled) == ["b1", "r1"]
        assert p.b.close_reason == "shutdown" and p.a.close_reason == "closed_by_peer"
        with pytest.raises(TunnelError, match="tunnel_closed"):
            request(p.a, "r2")


# -- handler failures -------------------------------------------------------------------


@async_test
async def test_a_handler_that_raises_becomes_a_reset_and_the_stream_keeps_serving():
    async def serve(ex: InboundExchange) -> None:
        if ex.head.path == "/boom":
            raise ValueError("kaput")
        if ex.head.path == "/forgot":
            return  # never responded
        await respond(ex, b"fine")

    async with Pair(b_handler=serve) as p:
        for rid, path, message in (("r1", "/boom", "ValueError: kaput"),
                                   ("r2", "/forgot", "handler ended without a complete response")):
            ex = request(p.a, rid, path=path)
            with pytest.raises(TunnelError) as info:
                await ex.head
            assert (info.value.code, info.value.message) == ("internal_error", message)
        ok = request(p.a, "r3")
        assert await read_all(ok.body) == b"fine"
        ok.close()
        assert not p.b.closed and p.b.requests_served == 3
        assert [f.reset.code for f in p.tb.sent("reset")] == ["internal_error", "internal_error"]


# -- the outbound queue and batches (moved from test_unit_balance.py) -------------------


class Recorder:
    """A transport that keeps what is written, with the loop turn it was written in; the peer never sends."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.turn = 0

    async def read(self) -> bytes | None:
        await asyncio.Event().wait()

    async def write(self, raw: bytes) -> None:
        self.writes.append((self.turn, raw))

    def peer(self) -> str:
        return "recorder"

    async def close(self) -> None:
        pass


@async_test
async def test_a_stream_fills_a_batch_only_while_its_message_has_room():
    def idle_stream() -> TunnelStream:  # not running: what is pushed stays queued
        return TunnelStream(Recorder(), limits=limits(max_inflight=2, max_batch_bytes=1000), on_request=unexpected,
                            peer_id="c1")

    stream = idle_stream()
    assert not stream.filling_batch                # nothing queued: nothing to share
    stream.push_encoded(b"x" * 100)
    assert stream.filling_batch
    stream.push_encoded((b"h", b"y" * 2000, b""))  # a body chunk fills the message and more
    assert not stream.filling_batch                # a request would wait behind it: go elsewhere

    stream = idle_stream()
    request(stream, "r1")
    assert stream.filling_batch                    # its head is queued, one more request fits
    request(stream, "r2")
    assert not stream.filling_batch                # at its in-flight limit

    stream = idle_stream()
    stream.push_encoded(b"x")
    stream.feed(frames.encode_frame(frames.goaway("bye")))
    assert stream.draining and not stream.filling_batch


@async_test
async def test_a_head_that_cannot_be_encoded_leaves_nothing_registered():
    async def serve(ex: InboundExchange) -> None:
        await respond(ex, b"ok")

    async with Pair(b_handler=serve) as p:
        for fields in (False, True):
            p.a.header_fields = fields
            with pytest.raises(TypeError):
                request(p.a, "r1", headers=[("X-Bad", 5)])
            assert p.a.pending == {} and p.a.requests_originated == 0
            assert not p.a.filling_batch  # nothing queued
        await settle(p.ta, p.tb)
        assert p.ta.frames == []  # nothing of it went out
        ok = request(p.a, "r1")   # the same id, now valid
        assert await read_all(ok.body) == b"ok"
        ok.close()
        assert p.a.requests_originated == 1 and len(p.ta.sent("headers")) == 1


async def frames_over_turns(serving: bool, turns: int, max_batch_bytes: int = 1 << 20) -> list[tuple[int, bytes]]:
    """(the turn it went out in, the message) for frames pushed one a turn."""
    transport = Recorder()
    stream = TunnelStream(transport, limits=limits(max_batch_bytes=max_batch_bytes),
                          on_request=lambda ex: asyncio.Event().wait(), peer_id="c1")
    if serving:  # a request being answered
        stream.feed(frames.encode_frame(frames.request_head(
            "r1", "t1", method="GET", path="/", scheme="http", authority="h", headers=[], end_stream=True,
            timeout_ms=1000)))
        assert stream.serving
    running = asyncio.get_running_loop().create_task(stream.run())
    for _ in range(3):
        await asyncio.sleep(0)  # the writer starts and waits for frames
    for transport.turn in range(8):
        if transport.turn < turns:
            stream.push_encoded(b"%d" % transport.turn)
        await asyncio.sleep(0)
    stream.close("done")
    await running
    assert not stream.serving
    return transport.writes


@async_test
async def test_a_serving_stream_lets_answers_of_consecutive_loop_turns_share_a_message():
    """While answers keep coming, turn after turn, the writer waits for them (up to three turns)
    so they share one gRPC message; a stream that serves nothing writes after one turn."""
    assert [m for _, m in await frames_over_turns(serving=True, turns=3)] == [b"012"]
    lingered = await frames_over_turns(serving=True, turns=6)
    assert [m for _, m in lingered] == [b"0123", b"45"], lingered  # at most three turns a message
    assert len(await frames_over_turns(serving=False, turns=3)) >= 2
    # A full message goes at once: the next turn's frame does not hold it back.
    full = await frames_over_turns(serving=True, turns=3, max_batch_bytes=2)
    assert full[0] == (1, b"01")


def test_a_peers_faults_are_all_counted_but_logged_within_bounds(caplog, monkeypatch):
    from types import SimpleNamespace

    from gateway.tunnel import faults

    clock = [100.0]
    monkeypatch.setattr(faults.time, "monotonic", lambda: clock[0])
    log = faults.FaultLog()
    peer = SimpleNamespace(peer_id="evil", group="g", label="evil/0")
    with caplog.at_level(logging.INFO, logger="gateway.tunnel"):
        for i in range(50):
            log.report(peer, "flow control window exceeded", f"r{i}")
        assert log.count == 50 and len(caplog.records) == faults.BURST
        clock[0] += 2.5  # two more lines' worth
        for i in range(5):
            log.report(peer, "flow control window exceeded", f"s{i}")
    assert log.count == 55 and len(caplog.records) == faults.BURST + 2
    # The first line after the quiet says how many were left out.
    after = caplog.records[faults.BURST]
    assert after.client_id == "evil" and after.request_id == "s0" and after.suppressed == 40
    assert caplog.records[-1].request_id == "s1" and caplog.records[-1].suppressed == 0
