"""Unit tests of a stream's outbound queue (gateway/tunnel/outbox.py): a batch that
reaches EARLY_FRAMES frames leaves at once, written where it is queued, when the
transport can take it without waiting; else it waits for the writer, in order; and
nothing jumps a batch the writer is still writing. Two TunnelStreams over the
in-memory transport of test_unit_stream, its `a` end able to write at once."""
from __future__ import annotations

import asyncio

from gateway.tunnel import frames
from gateway.tunnel.outbox import EARLY_FRAMES
from tests.test_unit_stream import End, Pair, async_test, request, respond, settle, until


class NowEnd(End):
    """An End that also offers `write_now`: it writes at once while `ready`, and counts
    the batches it took so."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.ready = True
        self.now = 0

    def write_now(self, parts, size: int) -> bool:
        if not self.ready or self.closed:  # whatever the writer's own write is waiting for
            return False
        raw = b"".join(parts)
        assert len(raw) == size
        self.now += 1
        self.moves += 1
        self.frames.extend(frames.decode_frames(raw))
        self.other.inbox.put_nowait(raw)
        return True


def now_pair(**kw) -> Pair:
    pair = Pair(b_handler=lambda ex: respond(ex, b"ok"), **kw)
    end = NowEnd("a")
    end.other, pair.tb.other = pair.tb, end
    pair.ta = pair.a.transport = end
    pair.a._write_now = end.write_now
    return pair


async def running(pair: Pair) -> Pair:
    """The pair once `a`'s writer runs (before, nothing goes early)."""
    await until(lambda: not pair.a._writing)
    return pair


def heads(end: End) -> list[str]:
    return [f.request_id for f in end.sent("headers", reply=False)]


async def answered(pair: Pair, exchanges) -> None:
    for ex in exchanges:
        await asyncio.wait_for(ex.head, 2)
    await settle(pair.ta, pair.tb)
    for ex in exchanges:
        ex.close()


@async_test
async def test_a_full_batch_leaves_at_once_in_order():
    n = 2 * EARLY_FRAMES + 3
    async with now_pair() as pair:
        await running(pair)
        exchanges = [request(pair.a, f"r{i}") for i in range(n)]  # one loop turn: the writer has not run
        assert pair.ta.now == 2 and heads(pair.ta) == [f"r{i}" for i in range(2 * EARLY_FRAMES)]
        await answered(pair, exchanges)
        assert heads(pair.ta) == [f"r{i}" for i in range(n)]  # the rest by the writer, after them
        assert pair.a.frames_out >= n


@async_test
async def test_a_batch_that_would_wait_stays_in_order_for_the_writer():
    async with now_pair() as pair:
        await running(pair)
        pair.ta.ready = False
        exchanges = [request(pair.a, f"r{i}") for i in range(EARLY_FRAMES + 2)]
        assert pair.ta.now == 0 and not heads(pair.ta)
        pair.ta.ready = True
        exchanges += [request(pair.a, f"s{i}") for i in range(2)]
        await answered(pair, exchanges)
        assert heads(pair.ta) == [f"r{i}" for i in range(EARLY_FRAMES + 2)] + ["s0", "s1"]


@async_test
async def test_nothing_jumps_a_batch_being_written():
    async with now_pair() as pair:
        await running(pair)
        pair.ta.flowing.clear()  # the writer's write waits (a peer not reading)
        first = request(pair.a, "first")
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the writer took "first" and waits in its write
        assert pair.a._writing
        later = [request(pair.a, f"r{i}") for i in range(EARLY_FRAMES + 1)]
        assert pair.ta.now == 0  # held back: it would overtake "first"
        pair.ta.flowing.set()
        await answered(pair, [first, *later])
        assert heads(pair.ta) == ["first"] + [f"r{i}" for i in range(EARLY_FRAMES + 1)]


@async_test
async def test_nothing_goes_early_before_the_stream_runs():
    """A stream is registered before its WELCOME is written (gateway/workers/tunnel_endpoint.py):
    what is queued for it meanwhile waits for its writer, however much it is."""
    pair = now_pair()
    exchanges = [request(pair.a, f"r{i}") for i in range(2 * EARLY_FRAMES)]
    assert pair.ta.now == 0 and not heads(pair.ta)
    async with pair:
        await answered(pair, exchanges)
        assert heads(pair.ta) == [f"r{i}" for i in range(2 * EARLY_FRAMES)]
