"""Tunnel admission's buckets and checks, on a clock the test turns; the
stream registry's identities (group, client id, certificate, connection)."""
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
    assert [a.hello("g", 0) for _ in range(5)] == [None] * 4 + ["group_connects"]
    assert a.hello("h", 0) is None  # another group's budget is its own


def test_group_failures_and_stream_cap():
    clock = Clock()
    a = _admission(clock, connects_per_group=100)
    assert a.hello("g", 9) is None
    assert a.hello("g", 10) == "group_streams"
    for i in range(6):
        a.failed(f"10.0.1.{i}", "g")  # a guesser spread over addresses
    assert a.hello("g", 0) == "group_failed_hellos"
    assert a.hello("h", 0) is None


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
