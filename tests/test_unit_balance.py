"""Unit tests of choosing a tunnel stream and of upstream server pools
(gateway/balance.py), and of limits (gateway/limits.py).
Pure logic: no sockets, no processes; time is a fake clock."""
from __future__ import annotations

import collections
import random
import types

import pytest

from gateway import balance, limits
from gateway.balance import STREAM_POLICIES, UPSTREAM_POLICIES, ServerPool, pick_least
from gateway.limits import LimitGate, Limits, TokenBucket, parse_limits
from gateway.settings import ConfigError
from gateway.tunnel.errors import STATUS, TunnelError
from gateway.balance import Balancer, Candidate, rendezvous

LOCAL = object()  # a stand-in for a TunnelStream this worker owns


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    fake = types.SimpleNamespace(monotonic=c.monotonic)
    monkeypatch.setattr(balance, "time", fake)
    monkeypatch.setattr(limits, "time", fake)
    return c


def local(client: str, inflight: int = 0, unhealthy: frozenset[str] = frozenset(), worker: int = 0) -> Candidate:
    return Candidate(client, worker, inflight, unhealthy, stream=LOCAL)


def remote(client: str, inflight: int = 0, unhealthy: frozenset[str] = frozenset(), worker: int = 1) -> Candidate:
    return Candidate(client, worker, inflight, unhealthy, stream=None)


# -- stream balancer: policies -------------------------------------------------------


def test_no_candidates_is_none():
    for policy in STREAM_POLICIES:
        assert Balancer().pick("g", policy, [], key="k") is None


def test_round_robin_spreads_evenly():
    cands = [local("c1"), local("c2"), local("c3")]
    b = Balancer()
    picks = [b.pick("g", "round_robin", cands).client_id for _ in range(300)]
    assert collections.Counter(picks) == {"c1": 100, "c2": 100, "c3": 100}
    assert picks[:6] == ["c1", "c2", "c3", "c1", "c2", "c3"]


def test_round_robin_counters_are_per_group():
    cands = [local("c1"), local("c2")]
    b = Balancer()
    first = [b.pick("a", "round_robin", cands).client_id for _ in range(3)]
    other = b.pick("b", "round_robin", cands).client_id
    assert first == ["c1", "c2", "c1"] and other == "c1"


def test_least_inflight_picks_the_least_loaded():
    cands = [local("c1", 5), local("c2", 2), local("c3", 9), local("c4", 3)]
    b = Balancer()
    assert all(b.pick("g", "least_inflight", cands).client_id == "c2" for _ in range(5))
    cands[1].inflight = 10
    assert b.pick("g", "least_inflight", cands).client_id == "c4"


def test_least_inflight_ties_go_to_the_first():
    cands = [local("c1", 4), local("c2", 1), local("c3", 1)]
    assert Balancer().pick("g", "least_inflight", cands).client_id == "c2"


@pytest.mark.parametrize("items,expected", [([5], 5), ([3, 1, 2], 1), ([2, 1, 1], 1), ([0, 0], 0)])
def test_pick_least(items, expected):
    assert pick_least(items, lambda x: x) == expected


def test_pick_least_ties_are_stable():
    items = [("a", 1), ("b", 0), ("c", 0)]
    assert pick_least(items, lambda x: x[1]) == ("b", 0)


# -- stream balancer: consistent hash ------------------------------------------------

KEYS = [f"10.0.{i // 250}.{i % 250}" for i in range(200)]


def owners(clients: list[str], cands_per_client: int = 2) -> dict[str, str]:
    b = Balancer()
    cands = [local(c) for c in clients for _ in range(cands_per_client)]
    return {k: b.pick("g", "consistent_hash", cands, key=k).client_id for k in KEYS}


def test_consistent_hash_is_stable_and_spread():
    first = owners(["c1", "c2", "c3"])
    assert owners(["c3", "c1", "c2"]) == first      # independent of candidate order
    counts = collections.Counter(first.values())
    assert set(counts) == {"c1", "c2", "c3"}
    assert min(counts.values()) >= 40               # about 200/3 each


@pytest.mark.parametrize("gone", ["c1", "c2", "c3"])
def test_consistent_hash_removing_a_client_moves_only_its_keys(gone):
    before = owners(["c1", "c2", "c3"])
    after = owners([c for c in ("c1", "c2", "c3") if c != gone])
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == gone}
    assert moved                                     # it did own some
    assert all(after[k] != gone for k in KEYS)


def test_consistent_hash_adding_a_client_takes_keys_only_to_it():
    before = owners(["c1", "c2", "c3"])
    after = owners(["c1", "c2", "c3", "c4"])
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved and all(after[k] == "c4" for k in moved)


def test_rendezvous_matches_balancer_and_ignores_order():
    clients = ["c1", "c2", "c3"]
    for k in KEYS[:50]:
        assert rendezvous(k, clients) == rendezvous(k, list(reversed(clients))) == owners(clients)[k]


def test_consistent_hash_spreads_over_the_winners_streams():
    cands = [local("c1"), local("c1"), local("c2")]
    key = next(k for k in KEYS if rendezvous(k, ["c1", "c2"]) == "c1")
    b = Balancer()
    picked = []
    for _ in range(4):
        c = b.pick("g", "consistent_hash", cands, key=key)
        c.inflight += 1  # what the request does to its stream
        picked.append(c)
    assert all(c.client_id == "c1" for c in picked)
    assert [id(c) for c in picked] == [id(cands[0]), id(cands[1])] * 2


class Queued:
    """A stand-in stream: filling_batch says whether a request sent now shares its next gRPC message."""

    def __init__(self, filling_batch: bool) -> None:
        self.filling_batch = filling_batch


def test_a_clients_stream_with_queued_frames_takes_the_request():
    # Several connections of one client: the request joins the gRPC message
    # already being filled instead of starting another.
    idle, filling = Candidate("c1", 0, 0, stream=Queued(False)), Candidate("c1", 0, 9, stream=Queued(True))
    for policy in STREAM_POLICIES:
        assert Balancer().pick("g", policy, [idle, filling], key="k") is filling
    filling.stream.filling_batch = False
    assert Balancer().pick("g", "round_robin", [idle, filling]) is idle  # else each in turn
    assert Balancer().pick("g", "least_inflight", [filling, idle]) is idle  # or the least busy


def test_policies_choose_clients_not_connections():
    # c1 has three connections, c2 one: round robin still alternates the clients,
    # and least_inflight weighs a client by all its streams.
    cands = [local("c1"), local("c1"), local("c1"), local("c2")]
    b = Balancer()
    assert [b.pick("g", "round_robin", cands).client_id for _ in range(4)] == ["c1", "c2", "c1", "c2"]
    cands = [local("c1", 2), local("c1", 2), local("c2", 3)]
    assert Balancer().pick("g", "least_inflight", cands).client_id == "c2"


def test_consistent_hash_without_key_is_round_robin():
    cands = [local("c1"), local("c2")]
    b = Balancer()
    assert [b.pick("g", "consistent_hash", cands).client_id for _ in range(4)] == ["c1", "c2", "c1", "c2"]


# -- stream balancer: health and locality --------------------------------------------


def test_unhealthy_for_the_upstream_are_skipped():
    cands = [local("c1", unhealthy=frozenset({"db"})), local("c2"), local("c3", unhealthy=frozenset({"db", "x"}))]
    b = Balancer()
    for policy in STREAM_POLICIES:
        assert {b.pick("g", policy, cands, upstream="db", key=k).client_id for k in KEYS[:20]} == {"c2"}


def test_unhealthy_for_another_upstream_still_count():
    cands = [local("c1", unhealthy=frozenset({"cache"})), local("c2")]
    b = Balancer()
    assert {b.pick("g", "round_robin", cands, upstream="db").client_id for _ in range(4)} == {"c1", "c2"}


def test_health_ignored_without_upstream():
    cands = [local("c1", unhealthy=frozenset({"db"})), local("c2")]
    b = Balancer()
    assert {b.pick("g", "round_robin", cands).client_id for _ in range(4)} == {"c1", "c2"}


def test_all_unhealthy_still_picks():
    cands = [local("c1", unhealthy=frozenset({"db"})), local("c2", unhealthy=frozenset({"db"}))]
    b = Balancer()
    assert {b.pick("g", "round_robin", cands, upstream="db").client_id for _ in range(4)} == {"c1", "c2"}
    assert b.pick("g", "least_inflight", cands, upstream="db") is not None


def test_consistent_hash_moves_a_key_off_an_unhealthy_owner():
    key = next(k for k in KEYS if rendezvous(k, ["c1", "c2", "c3"]) == "c1")
    cands = [local("c1", unhealthy=frozenset({"db"})), local("c2"), local("c3")]
    b = Balancer()
    picked = b.pick("g", "consistent_hash", cands, upstream="db", key=key).client_id
    assert picked == rendezvous(key, ["c2", "c3"])
    assert b.pick("g", "consistent_hash", cands, upstream="other", key=key).client_id == "c1"


@pytest.mark.parametrize("policy", STREAM_POLICIES)
def test_prefers_local_streams(policy):
    cands = [remote("r1"), local("l1", inflight=50), remote("r2"), local("l2", inflight=60)]
    b = Balancer()
    picks = {b.pick("g", policy, cands).client_id for _ in range(10)}
    assert picks <= {"l1", "l2"} and picks


@pytest.mark.parametrize("policy", STREAM_POLICIES)
def test_prefer_remote_turns_it_around(policy):
    cands = [remote("r1", inflight=50), local("l1"), remote("r2", inflight=60), local("l2")]
    b = Balancer()
    picks = {b.pick("g", policy, cands, prefer_remote=True).client_id for _ in range(10)}
    assert picks <= {"r1", "r2"} and picks


def test_only_remote_streams_are_used_when_no_local():
    cands = [remote("r1"), remote("r2")]
    b = Balancer()
    assert {b.pick("g", "round_robin", cands).client_id for _ in range(4)} == {"r1", "r2"}
    assert Balancer().pick("g", "round_robin", [local("l1")], prefer_remote=True).client_id == "l1"


def test_least_inflight_among_local_only():
    cands = [remote("r1", inflight=0), local("l1", inflight=7), local("l2", inflight=3)]
    assert Balancer().pick("g", "least_inflight", cands).client_id == "l2"


def test_health_beats_locality():
    cands = [local("l1", unhealthy=frozenset({"db"})), remote("r1")]
    assert Balancer().pick("g", "round_robin", cands, upstream="db").client_id == "r1"


# -- server pools --------------------------------------------------------------------

SERVERS = ["http://a:1", "http://b:2", "http://c:3"]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError):
        ServerPool(SERVERS, "least_inflight")
    assert set(UPSTREAM_POLICIES) == {"round_robin", "random", "least_conn"}


def test_pool_round_robin(clock):
    pool = ServerPool(SERVERS, "round_robin")
    assert [pool.acquire() for _ in range(6)] == SERVERS * 2


def test_pool_random_uses_every_healthy_server(clock, monkeypatch):
    monkeypatch.setattr(balance, "random", random.Random(12345))
    pool = ServerPool(SERVERS, "random", max_fails=1)
    picks = collections.Counter(pool.acquire() for _ in range(300))
    assert set(picks) == set(SERVERS) and min(picks.values()) > 50
    pool.report("http://b:2", ok=False)
    assert {pool.acquire() for _ in range(100)} == {"http://a:1", "http://c:3"}


def test_pool_least_conn(clock):
    pool = ServerPool(SERVERS, "least_conn")
    first = [pool.acquire() for _ in range(3)]
    assert first == SERVERS                                    # each gets one
    assert [pool.active(s) for s in SERVERS] == [1, 1, 1]
    pool.release("http://b:2")
    assert pool.acquire() == "http://b:2"
    pool.release("http://c:3")
    pool.release("http://a:1")
    assert pool.active("http://a:1") == 0 and pool.active("http://c:3") == 0
    assert pool.acquire() == "http://a:1"                       # tie: the first
    assert pool.acquire() == "http://c:3"


def test_passive_health_takes_a_server_out_for_fail_timeout(clock):
    pool = ServerPool(SERVERS, "round_robin", max_fails=2, fail_timeout=10.0)
    pool.report("http://a:1", ok=False)
    assert pool.is_healthy("http://a:1")                        # one failure is not enough
    pool.report("http://a:1", ok=False)
    assert not pool.is_healthy("http://a:1")
    assert pool.healthy_servers() == ["http://b:2", "http://c:3"]
    assert "http://a:1" not in {pool.acquire() for _ in range(10)}
    clock.advance(9.9)
    assert not pool.is_healthy("http://a:1")
    clock.advance(0.2)
    assert pool.is_healthy("http://a:1")
    assert "http://a:1" in {pool.acquire() for _ in range(3)}


def test_passive_health_success_resets_the_count(clock):
    pool = ServerPool(SERVERS, max_fails=2)
    for ok in (False, True, False, True, False):
        pool.report("http://a:1", ok=ok)
    assert pool.is_healthy("http://a:1")


def test_passive_health_off_with_max_fails_zero(clock):
    pool = ServerPool(SERVERS, max_fails=0)
    for _ in range(100):
        pool.report("http://a:1", ok=False)
    assert pool.healthy_servers() == SERVERS


def test_all_down_still_picks_among_all(clock):
    pool = ServerPool(SERVERS, "round_robin", max_fails=1)
    for s in SERVERS:
        pool.report(s, ok=False)
    assert not pool.healthy
    assert {pool.acquire() for _ in range(3)} == set(SERVERS)


def test_active_health(clock):
    pool = ServerPool(SERVERS, max_fails=1, fail_timeout=5.0)
    pool.set_health("http://c:3", ok=False)
    clock.advance(3600)
    assert not pool.is_healthy("http://c:3")                     # stays down until a check passes
    pool.report("http://b:2", ok=False)
    assert pool.healthy_servers() == ["http://a:1"]
    pool.set_health("http://b:2", ok=True)                       # clears the passive state too
    pool.set_health("http://c:3", ok=True)
    assert pool.healthy_servers() == SERVERS


# -- limits --------------------------------------------------------------------------


def test_token_bucket_burst_then_wait(clock):
    bucket = TokenBucket(rate=2.0, capacity=3.0)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    clock.advance(0.25)
    assert bucket.take() == pytest.approx(0.25)
    clock.advance(0.25)
    assert bucket.take() == 0.0
    assert bucket.take() > 0


def test_token_bucket_refills_only_to_capacity(clock):
    bucket = TokenBucket(rate=10.0, capacity=2.0)
    clock.advance(1000)
    takes = [bucket.take() for _ in range(3)]
    assert takes[:2] == [0.0, 0.0] and takes[2] == pytest.approx(0.1)


def test_rate_limit_verdict_is_429_with_retry_after(clock):
    gate = LimitGate(Limits(rate=10.0, burst=5.0))
    assert [gate.admit() for _ in range(5)] == [None] * 5
    verdict = gate.admit()
    assert verdict is not None
    code, wait = verdict
    assert code == "rate_limited" and STATUS[code] == 429 and TunnelError(code).status == 429
    assert wait == pytest.approx(0.1)
    assert gate.inflight == 5                                   # a refusal takes no slot
    clock.advance(wait)
    assert gate.admit() is None


def test_rate_burst_defaults_to_rate_and_at_least_one(clock):
    gate = LimitGate(Limits(rate=3.0))
    verdicts = [gate.admit() for _ in range(4)]
    assert verdicts[:3] == [None] * 3 and verdicts[3] is not None
    slow = LimitGate(Limits(rate=0.5))
    assert slow.admit() is None
    assert slow.admit() == ("rate_limited", pytest.approx(2.0))


def test_rate_is_shared_between_workers(clock):
    gate = LimitGate(Limits(rate=10.0, burst=10.0), share=2)
    assert [gate.admit() for _ in range(5)] == [None] * 5
    code, wait = gate.admit()
    assert code == "rate_limited" and wait == pytest.approx(0.2)


def test_inflight_limit_admits_and_releases(clock):
    gate = LimitGate(Limits(max_inflight=2))
    assert gate.admit() is None and gate.admit() is None
    assert gate.inflight == 2
    assert gate.admit() == ("overloaded", 1.0)
    assert STATUS["overloaded"] == 503
    gate.release()
    assert gate.inflight == 1
    assert gate.admit() is None
    assert gate.admit() == ("overloaded", 1.0)


def test_no_limits_admit_everything(clock):
    gate = LimitGate(Limits())
    assert Limits().empty and not Limits(max_inflight=1).empty and not Limits(rate=1).empty
    assert all(gate.admit() is None for _ in range(1000))
    assert gate.bucket is None


def test_parse_limits():
    assert parse_limits({"max_inflight": 4, "rate": 10, "burst": 20}, "f", "groups.g") == Limits(4, 0, 10.0, 20.0)
    assert parse_limits({}, "f", "k") == Limits()


@pytest.mark.parametrize("table,key", [
    ({"max_inflight": -1}, "groups.g.max_inflight"),
    ({"max_inflight": 1.5}, "groups.g.max_inflight"),
    ({"max_body_bytes": True}, "groups.g.max_body_bytes"),
    ({"rate": "10"}, "groups.g.rate"),
    ({"rate": -1}, "groups.g.rate"),
    ({"burst": 5}, "groups.g.burst"),                  # a burst needs a rate
])
def test_parse_limits_errors(table, key):
    with pytest.raises(ConfigError) as info:
        parse_limits(table, "gw.toml", "groups.g")
    assert (info.value.file, info.value.key) == ("gw.toml", key)
