"""Tunnel admission's buckets and checks, on a clock the test turns (failed
HELLOs charged to sources, never to a group alone); the stream registry's
identities (group, client id, certificate, connection)."""
from __future__ import annotations

from gateway.workers import admission as admission_module
from gateway.workers.admission import Admission, Buckets, source_address
from gateway.workers.registry import StreamRegistry, connection_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _admission(clock: Clock, **kw: int) -> Admission:
    limits = dict(connects_per_source=5, failed_hellos_per_source=3, connects_per_group=4,
                  failed_hellos_per_group=6, max_streams_per_group=10)
    limits.update(kw)
    return Admission(**limits, clock=clock)


def test_bucket_allows_a_burst_then_refills_evenly():
    clock = Clock()
    b = Buckets(6, clock)
    assert all(b.take("a") for _ in range(6))
    assert not b.take("a") and not b.available("a")
    assert b.take("b")  # another key has its own bucket
    clock.now += 10  # 6 a minute: one every 10 s
    assert b.take("a") and not b.take("a")
    clock.now += 3600  # never more than the burst
    assert sum(b.take("a") for _ in range(10)) == 6


def test_bucket_table_is_bounded(monkeypatch):
    monkeypatch.setattr(admission_module, "MAX_KEYS", 100)
    b = Buckets(1, Clock())
    for i in range(1000):
        b.take(f"10.0.{i // 256}.{i % 256}")
    assert len(b) == 100


def test_bucket_table_forgets_refilled_buckets():
    # However many sources came and went, only about a minute of them is remembered.
    clock = Clock()
    b = Buckets(6, clock)
    for i in range(500):
        b.take(f"10.0.{i // 256}.{i % 256}")
    assert len(b) == 500
    clock.now += 10  # one token back each: full again
    b.take("10.9.9.9")
    assert len(b) == 1
    assert b.take("10.0.0.0")  # a forgotten key starts full, as it had refilled


def test_failed_hellos_per_source_refuse_new_connections_until_a_refill():
    clock = Clock()
    a = _admission(clock)
    for _ in range(3):
        assert a.connect("10.0.0.1") is None
        a.failed("10.0.0.1", None)  # an unknown group: counted for the source only
    assert a.connect("10.0.0.1") == "source_failed_hellos"
    assert a.connect("10.0.0.2") is None  # another address is not punished
    clock.now += 20  # 3 a minute: one more try after 20 s
    assert a.connect("10.0.0.1") is None


def test_connects_per_source_and_per_group():
    clock = Clock()
    a = _admission(clock)
    assert [a.connect("10.0.0.1") for _ in range(6)] == [None] * 5 + ["source_connects"]
    assert [a.admit("g", 0) for _ in range(5)] == [None] * 4 + ["group_connects"]
    assert a.admit("h", 0) is None  # another group's budget is its own


def test_stream_cap_per_group():
    a = _admission(Clock(), connects_per_group=100)
    assert a.admit("g", 9) is None
    assert a.admit("g", 10) == "group_streams"
    assert a.admit("h", 10) == "group_streams" and a.admit("h", 0) is None


def test_failed_hellos_are_charged_to_the_source_never_to_the_group_alone():
    clock = Clock()
    a = _admission(clock, failed_hellos_per_source=100, failed_hellos_per_group=3)
    for _ in range(3):
        assert a.hello("10.0.0.9", "g") is None
        a.failed("10.0.0.9", "g")  # a guesser naming g, wrong tokens
    assert a.hello("10.0.0.9", "g") == "group_failed_hellos"
    # Its address may still name other groups (its per-source bound is the guess bound) ...
    assert a.hello("10.0.0.9", "h") is None
    # ... and another address's HELLO for g goes on, to be charged only once authenticated.
    assert a.hello("10.0.0.1", "g") is None
    assert a.connect("10.0.0.1") is None and a.admit("g", 0) is None
    clock.now += 20  # 3 a minute: one more try after 20 s
    assert a.hello("10.0.0.9", "g") is None


def test_failures_spread_over_addresses_refuse_no_one_else():
    a = _admission(Clock(), failed_hellos_per_source=2, failed_hellos_per_group=2)
    for i in range(50):
        for _ in range(2):
            a.failed(f"10.0.1.{i}", "g")
    assert a.connect("10.0.0.1") is None and a.hello("10.0.0.1", "g") is None
    assert [a.admit("g", 0) for _ in range(4)] == [None] * 4  # connects_per_group untouched


def test_unauthenticated_hellos_spend_nothing_of_the_group():
    a = _admission(Clock(), connects_per_group=1, failed_hellos_per_source=1000, failed_hellos_per_group=1000)
    for _ in range(100):
        assert a.hello("10.0.0.9", "g") is None
        a.failed("10.0.0.9", "g")
    assert a.admit("g", 0) is None and a.admit("g", 0) == "group_connects"


def test_a_source_out_of_failures_is_refused_at_its_hello_too():
    # Connections opened at once all pass `connect` before any of them fails.
    a = _admission(Clock(), failed_hellos_per_source=2)
    assert all(a.connect("10.0.0.9") is None for _ in range(4))
    a.failed("10.0.0.9", "g")
    a.failed("10.0.0.9", "h")
    assert a.hello("10.0.0.9", "x") == "source_failed_hellos"
    assert a.hello("10.0.0.1", "x") is None


def test_group_names_are_not_kept_whole():
    a = _admission(Clock())
    a.failed("10.0.0.9", "x" * 1_000_000)  # a name is the peer's, up to a whole message
    assert all(len(repr(key)) < 200 for key in a.named_failures._table)


def test_source_address_of_grpc_peers():
    assert source_address("ipv4:10.1.2.3:5000") == "10.1.2.3"
    assert source_address("ipv6:[::1]:5000") == "::1"
    assert source_address("ipv6:[2001:db8::7]:443") == "2001:db8::7"
    assert source_address("unix:/tmp/x") == "unix:/tmp/x"


class _Stream:
    """What the registry reads of a stream."""

    def __init__(self, group: str, label: str) -> None:
        self.group, self.label, self.draining, self.closed = group, label, False, False


def _stream(group: str, client_id: str, index: int) -> _Stream:
    return _Stream(group, f"{client_id}/{index}")


def test_registry_replaces_only_the_same_identity_and_connection():
    reg = StreamRegistry()
    victim = _stream("other", "c1", 0)
    assert reg.add(victim, connection_key("other", "c1", 0)) is None
    # Same client id and index, another group: a different identity, nothing replaced.
    assert reg.add(_stream("evil", "c1", 0), connection_key("evil", "c1", 0)) is None
    # Same group and id, another certificate (mTLS): different too.
    assert reg.add(_stream("other", "c1", 0), connection_key("other", "c1", 0, frozenset({"x.evil"}))) is None
    # Same group, id and index: the newer one replaces the older.
    newer = _stream("other", "c1", 0)
    assert reg.add(newer, connection_key("other", "c1", 0)) is victim
    assert reg.count("other") == 3 and reg.count("evil") == 1
    reg.remove(victim)  # the replaced stream goes: the newer stays registered
    assert reg.add(_stream("other", "c1", 0), connection_key("other", "c1", 0)) is newer
