"""The fleet registry (gateway/cluster/registry.py) against a real redis-server:
registries in one event loop, each one node's view of the fleet. Nodes see each
other, changes travel by pub/sub (well under the ttl), a dead node's lease
expires, Redis going away and coming back, a password, fleets sharing a Redis.

No mocks and no sleeps that prove anything: every wait polls with a deadline;
where a test proves that something *stays* true it watches it for a while."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import socket
import time
from typing import Any, Awaitable, Callable

from redis.asyncio import Redis

from gateway.cluster.record import merge
from gateway.cluster.registry import NodeRecord, Registry, cancel_all
from tests.redis_server import RedisServer

GUARD = 20.0  # a test that hangs fails after this long instead of hanging the suite
TTL = 1.0  # node_ttl of the tests about leases: renewals every 1/3 s, resyncs every 1/2 s
LONG_TTL = 5.0  # where a change must be seen before any resync could show it: only pub/sub is that fast


def async_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), GUARD))
    return run


async def until(check: Callable[[], Any], timeout: float, what: str) -> float:
    """Poll `check` until it is true; the seconds that took. Fails the test at the deadline."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def holds(check: Callable[[], Any], duration: float, what: str) -> None:
    """`check` stays true for `duration` (looked at every 10 ms)."""
    end = time.monotonic() + duration
    while time.monotonic() < end:
        assert check(), f"stopped holding: {what}"
        await asyncio.sleep(0.01)


def node(node_id: str, n: int = 2) -> NodeRecord:
    return NodeRecord(node_id, peer=f"tcp://127.0.0.{n}:7100", tunnel=f"127.0.0.{n}:50001", started=time.time())


class Fleet:
    """Registries started on entry, each with its on_change calls recorded; all stopped on exit."""

    def __init__(self, url: str, prefix: str, ttl: float = TTL) -> None:
        self.url, self.prefix, self.ttl = url, prefix, ttl
        self.registries: list[Registry] = []
        self.changes: dict[str, list[dict[str, NodeRecord]]] = {}

    async def add(self, node_id: str, n: int = 2, url: str | None = None) -> Registry:
        seen = self.changes.setdefault(node_id, [])
        reg = Registry(url or self.url, node(node_id, n), prefix=self.prefix, node_ttl=self.ttl,
                       on_change=seen.append)
        self.registries.append(reg)
        await reg.start()
        return reg

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(r.stop() for r in self.registries))


def sees(reg: Registry, *ids: str) -> bool:
    return set(reg.nodes()) == set(ids)


async def die(reg: Registry) -> None:
    """What a killed process does to the registry: its tasks stop and its connections
    close, with no goodbye (the key stays until its lease expires)."""
    reg._stopped = True
    await cancel_all(reg._tasks)
    reg._tasks = []
    await reg._redis.aclose()


def test_merge_what_redis_said_into_the_copy():
    """The pure part: who joined, left or changed; a renewal (seen alone) is no change; the own record stays."""
    a, b, c = node("a"), node("b", 3), node("c", 4)
    nodes = {"a": a, "b": b}
    out, joined, left, changed = merge(nodes, "a", {"b": dataclasses.replace(b, seen=b.seen + 1)}, drop_absent=True)
    assert (set(out), joined, left, changed) == ({"a", "b"}, [], [], False) and out["b"].seen == b.seen + 1
    out, joined, left, changed = merge(nodes, "a", {"c": c, "a": None}, drop_absent=False)
    assert (set(out), joined, left, changed) == ({"a", "b", "c"}, ["c"], [], True)
    out, joined, left, changed = merge(nodes, "a", {"c": c}, drop_absent=True)  # a resync without b: b left
    assert (set(out), joined, left, changed) == ({"a", "c"}, ["c"], ["b"], True)
    out, _, left, changed = merge(nodes, "a", {"b": None, "x": None}, drop_absent=False)  # a leave message
    assert (set(out), left, changed) == ({"a"}, ["b"], True)
    out, _, _, changed = merge(nodes, "a", {"b": dataclasses.replace(b, state="draining")}, drop_absent=False)
    assert changed and out["b"].state == "draining" and nodes["b"].state == "serving"  # the input is not mutated


@async_test
async def test_nodes_see_each_other_and_changes_travel_by_pubsub(redis_server):
    async with Fleet(redis_server.url, "t-see", ttl=LONG_TTL) as fleet:
        a, b, c = [await fleet.add(i, n) for i, n in (("a", 2), ("b", 3), ("c", 4))]
        took = await until(lambda: all(sees(r, "a", "b", "c") for r in (a, b, c)), 1.0, "every node sees all three")
        assert a.up and b.up and c.up
        assert b.nodes()["a"].peer == "tcp://127.0.0.2:7100" and b.nodes()["c"].tunnel == "127.0.0.4:50001"

        # What Redis holds: the record with its groups and seen, under a lease of node_ttl.
        client = Redis.from_url(redis_server.url)
        try:
            held = NodeRecord.from_json(await client.get("t-see:node:a"))
            assert held.node_id == "a" and held.state == "serving" and held.seen > 0
            assert 0 < await client.pttl("t-see:node:a") <= LONG_TTL * 1000
        finally:
            await client.aclose()

        # Groups and state: seen by the others long before a resync (every 2.5 s here) would show them.
        a.set_groups({"g1": 2, "g2": 1})
        took_groups = await until(lambda: all(r.nodes()["a"].groups == {"g1": 2, "g2": 1} for r in (b, c)),
                                  0.5, "a's groups at b and c")
        b.set_state("draining")
        took_state = await until(lambda: all(r.nodes()["b"].state == "draining" for r in (a, c)),
                                 0.5, "b draining at a and c")
        assert a.nodes()["a"].groups == {"g1": 2, "g2": 1}  # the own record at once, no await
        assert any(ch.get("a") and ch["a"].groups == {"g1": 2, "g2": 1} for ch in fleet.changes["c"])
        assert fleet.changes["a"][-1]["b"].state == "draining"

        # stop() leaves at once: deleted and announced, not left to expire.
        await c.stop()
        took_leave = await until(lambda: sees(a, "a", "b") and sees(b, "a", "b"), 0.5, "c gone after stop()")
        assert "c" not in fleet.changes["a"][-1]
        print(f"\njoin {took:.3f}s, groups {took_groups:.3f}s, state {took_state:.3f}s, leave {took_leave:.3f}s")


@async_test
async def test_a_burst_of_changes_is_coalesced(redis_server):
    async with Fleet(redis_server.url, "t-burst", ttl=LONG_TTL) as fleet:
        a, b = await fleet.add("a"), await fleet.add("b", 3)
        await until(lambda: a.up and b.up and sees(b, "a", "b"), 1.0, "a and b up")
        listener = Redis.from_url(redis_server.url)
        pubsub = listener.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe("t-burst:fleet")
            for i in range(100):
                a.set_groups({"g": i + 1})
            await until(lambda: b.nodes()["a"].groups == {"g": 100}, 0.5, "the last of the burst at b")
            announced, end = 0, time.monotonic() + 0.3  # a second write would have been made by now
            while time.monotonic() < end:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
                announced += msg is not None and msg["data"] == b"a"
            assert 1 <= announced <= 2, f"100 changes were {announced} writes; one in flight at most, newest wins"
        finally:
            await pubsub.aclose()
            await listener.aclose()


@async_test
async def test_two_live_nodes_with_one_node_id_are_reported(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="gateway.cluster")
    async with Fleet(redis_server.url, "t-clash") as fleet:
        first = await fleet.add("a")
        await until(lambda: first.up, 1.0, "the first a up")
        await fleet.add("a", 3)  # another start time: another node, misconfigured
        await until(lambda: any("another node writes this node_id" in r.getMessage() for r in caplog.records),
                    2 * TTL, "the clash reported")


@async_test
async def test_a_dead_node_leaves_within_one_and_a_half_ttl(redis_server):
    async with Fleet(redis_server.url, "t-dead") as fleet:
        a, b, c = await fleet.add("a"), await fleet.add("b", 3), await fleet.add("c", 4)
        await until(lambda: sees(a, "a", "b", "c") and sees(c, "a", "b", "c"), 1.0, "all three see each other")
        await die(b)
        took = await until(lambda: sees(a, "a", "c") and sees(c, "a", "c"), 1.5 * TTL + 0.3, "b's lease expired")
        assert a.up and c.up
        print(f"\ndead node gone after {took:.3f}s (ttl {TTL:g}s)")


@async_test
async def test_fleets_sharing_a_redis_do_not_see_each_other(redis_server):
    # "f*" would match every f... prefix unescaped; "fx:node:in" nests its keys under fx's pattern.
    async with Fleet(redis_server.url, "fx") as fx, Fleet(redis_server.url, "fy") as fy, \
            Fleet(redis_server.url, "fx:node:in") as nested, Fleet(redis_server.url, "f*") as star:
        x1, x2 = await fx.add("x1"), await fx.add("x2")
        y1 = await fy.add("y1")
        n1 = await nested.add("n1")
        s1 = await star.add("s1")
        await until(lambda: sees(x1, "x1", "x2") and sees(x2, "x1", "x2"), 1.0, "fx's two nodes see each other")
        await until(lambda: all(r.up for r in (y1, n1, s1)), 1.0, "every registry up")
        await holds(lambda: sees(x1, "x1", "x2") and sees(y1, "y1") and sees(n1, "n1") and sees(s1, "s1"),
                    TTL, "each fleet sees only its own nodes, over two resyncs")


@async_test
async def test_redis_down_keeps_the_copy_and_up_again_resyncs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gateway.cluster")
    with RedisServer(tmp_path) as server:
        async with Fleet(server.url, "t-down") as fleet:
            a, b = await fleet.add("a"), await fleet.add("b", 3)
            await until(lambda: sees(a, "a", "b") and sees(b, "a", "b") and a.up and b.up, 1.0, "a and b up")
            b.set_groups({"g1": 1})
            await until(lambda: a.nodes()["b"].groups == {"g1": 1}, 0.5, "b's groups at a")

            server.stop()
            took_down = await until(lambda: not a.up and not b.up, TTL, "both registries down")
            # Over three ttls of retries: the copies stay whole, and each says so once.
            await holds(lambda: sees(a, "a", "b") and sees(b, "a", "b") and not a.up, 3 * TTL, "copies kept")
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert sorted(r.node_id for r in warnings) == ["a", "b"], [r.getMessage() for r in warnings]
            assert "unreachable" in warnings[0].getMessage()

            b.set_groups({"g1": 1, "g2": 3})  # made while down: written when Redis is back
            await asyncio.to_thread(server.start)  # same port, no data: every key is gone
            took_up = await until(lambda: a.up and b.up, 2 * TTL, "both registries up again")
            await until(lambda: a.nodes()["b"].groups == {"g1": 1, "g2": 3}, TTL, "b's newer groups at a")
            client = Redis.from_url(server.url)
            try:
                assert sorted(await client.keys("t-down:node:*")) == [b"t-down:node:a", b"t-down:node:b"]
            finally:
                await client.aclose()
            await holds(lambda: sees(a, "a", "b") and sees(b, "a", "b"), TTL, "nobody dropped after the return")
            back = [r for r in caplog.records if "reachable again" in r.getMessage()]
            assert sorted(r.node_id for r in back) == ["a", "b"] and all(r.levelno == logging.INFO for r in back)
            assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 2
            print(f"\ndown noticed in {took_down:.3f}s, up again in {took_up:.3f}s after Redis answered")


@async_test
async def test_a_node_started_while_redis_is_down_joins_when_it_answers(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gateway.cluster")
    server = RedisServer(tmp_path)  # its port chosen, nothing listening yet
    try:
        async with Fleet(server.url, "t-late") as fleet:
            c = await fleet.add("c")
            await until(lambda: any(r.levelno == logging.WARNING for r in caplog.records), TTL, "the warning")
            assert not c.up and sees(c, "c") and c.nodes()["c"].peer == "tcp://127.0.0.2:7100"
            c.set_state("draining")  # its own record follows at once, Redis or not
            assert c.nodes()["c"].state == "draining"

            await asyncio.to_thread(server.start)
            d = await fleet.add("d", 3)
            took = await until(lambda: c.up and sees(c, "c", "d") and sees(d, "c", "d"), 2 * TTL, "c joined")
            assert d.nodes()["c"].state == "draining"
            assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
            print(f"\njoined {took:.3f}s after Redis started")
    finally:
        server.stop()


@async_test
async def test_a_redis_that_never_answers_hangs_nothing(caplog):
    caplog.set_level(logging.INFO, logger="gateway.cluster")
    # Accepts connections (the kernel's backlog) and never reads: every command times out.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        reg = Registry(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", node("a"), prefix="t-hang", node_ttl=TTL)
        await reg.start()
        await until(lambda: any(r.levelno == logging.WARNING for r in caplog.records), 2 * TTL, "the warning")
        assert not reg.up and sees(reg, "a")
        start = time.monotonic()
        await reg.stop()
        took = time.monotonic() - start
        assert took < 2 * TTL, f"stop() took {took:.2f}s against a silent Redis"
        assert any("could not leave" in r.getMessage() for r in caplog.records)


@async_test
async def test_a_password_works_and_never_reaches_the_log(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    password = "pw-Zq81-never-logged"
    with RedisServer(tmp_path, password=password) as server:
        async with Fleet(server.url, "t-pw") as fleet:
            a, b = await fleet.add("a"), await fleet.add("b", 3)
            await until(lambda: sees(a, "a", "b") and sees(b, "a", "b") and a.up and b.up, 1.0, "a and b up")
            assert password not in a.where and a.where.endswith("@127.0.0.1:%d/0" % server.port)

            wrong = await fleet.add("w", 4, url=server.url_with("not-the-password"))
            await until(lambda: any(r.levelno == logging.ERROR for r in caplog.records), 2 * TTL, "an error")
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1 and errors[0].node_id == "w", [r.getMessage() for r in errors]
            assert "credentials" in errors[0].getMessage()
            # No crash: it keeps serving its own node and retrying, and the others never see it.
            await holds(lambda: not wrong.up and sees(wrong, "w") and sees(a, "a", "b") and not any(
                t.done() for t in wrong._tasks), TTL, "the wrong password: down, running, unseen")

            server.stop()  # the warnings of an outage name the URL: masked too
            await until(lambda: not a.up and not b.up, TTL, "down")
    for record in caplog.records:
        assert password not in record.getMessage() and password not in str(vars(record)), record
    assert password not in caplog.text
