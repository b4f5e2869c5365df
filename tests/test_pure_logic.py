"""Unit tests of the pure parts (no sockets, no processes): rule matching,
header handling, ids, the frame codec, balancing and limits."""
from __future__ import annotations

import collections
import time

import pytest

from gateway.balance import ServerPool
from gateway.grpc_io import choose_grpc_io, grpc_io_in_use
from gateway.http.headers import end_to_end, forwarded, has_body_response
from gateway.ids import RequestIds, gateway_prefix, origin_worker, trace_id_from
from gateway.limits import LimitGate, Limits
from gateway.rules import Rule, first_match, path_matches, strip_port
from gateway.tunnel import frames
from gateway.balance import Balancer, Candidate, rendezvous


# -- rules ---------------------------------------------------------------------------

RULES = [
    Rule("api-post", "g-api", host="api.example.com", path_prefix="/v1", methods=frozenset({"POST"})),
    Rule("beta", "g-beta", host="*.example.com", headers=(("x-beta", "1"),)),
    Rule("wild", "g-wild", host="*.example.com"),
    Rule("all", "g-default"),
]


@pytest.mark.parametrize("host,path,method,headers,expected", [
    ("api.example.com", "/v1/items", "POST", {}, "api-post"),
    ("API.example.com:8443", "/v1", "POST", {}, "api-post"),        # case and port do not matter
    ("api.example.com", "/v1/items", "GET", {}, "wild"),           # method mismatch: next rule
    ("api.example.com", "/v10", "POST", {}, "wild"),               # prefixes are segment-aware
    ("a.example.com", "/", "GET", {"x-beta": "1"}, "beta"),
    ("a.example.com", "/", "GET", {"x-beta": "2"}, "wild"),
    ("example.com", "/", "GET", {}, "all"),                        # *.suffix needs a subdomain
    ("other.org", "/x", "DELETE", {}, "all"),
])
def test_first_match_wins(host, path, method, headers, expected):
    assert first_match(RULES, host, path, method, headers).name == expected


def test_no_rule_matches():
    assert first_match(RULES[:3], "other.org", "/", "GET", {}) is None


@pytest.mark.parametrize("prefix,path,ok", [
    ("/api", "/api", True), ("/api", "/api/x", True), ("/api", "/api?q=1", True),
    ("/api", "/apix", False), ("/api/", "/api/x", True), ("/", "/anything", True),
])
def test_path_prefix_is_segment_aware(prefix, path, ok):
    assert path_matches(prefix, path) is ok


def test_strip_prefix_and_ports():
    rule = Rule("r", "g", path_prefix="/svc", strip_prefix=True)
    assert rule.rewrite_path("/svc/a/b?q=1") == "/a/b?q=1"
    assert rule.rewrite_path("/svc") == "/"
    assert Rule("r", "g", path_prefix="/svc").rewrite_path("/svc/a") == "/svc/a"
    assert strip_port("[::1]:8080") == "[::1]" and strip_port("Host.Example:80") == "host.example"


# -- what a proxy changes in a message ----------------------------------------------

def test_hop_by_hop_headers_are_dropped_and_repeats_kept():
    headers = [("Connection", "keep-alive, X-Private"), ("Keep-Alive", "5"), ("TE", "trailers"),
               ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("Proxy-Authorization", "x"),
               ("X-Private", "secret"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Kept", "yes")]
    assert end_to_end([(n.encode(), v.encode()) for n, v in headers]) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Kept", "yes")]


def test_forwarded_headers_append_and_keep():
    out = forwarded([("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "https")],
                    remote="127.0.0.1", proto="http", host="a.example")
    assert ("X-Forwarded-For", "10.0.0.1, 127.0.0.1") in out
    assert ("X-Forwarded-Proto", "https") in out and ("X-Forwarded-Proto", "http") not in out
    assert ("X-Forwarded-Host", "a.example") in out


@pytest.mark.parametrize("method,status,body", [
    ("GET", 200, True), ("HEAD", 200, False), ("GET", 204, False), ("GET", 304, False),
    ("GET", 101, False), ("POST", 201, True),
])
def test_which_responses_have_a_body(method, status, body):
    assert has_body_response(method, status) is body


# -- ids -------------------------------------------------------------------------------

def test_request_ids_are_unique_and_name_their_worker():
    ids = RequestIds(gateway_prefix("ab12cd34", 3))
    many = [ids.next() for _ in range(10000)]
    assert len(set(many)) == len(many)
    assert {origin_worker(i) for i in many} == {3}
    assert origin_worker("client-side-id") is None


@pytest.mark.parametrize("headers,expected", [
    ({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}, "0af7651916cd43dd8448eb211c80319c"),
    ({"traceparent": "00-" + "0" * 32 + "-b7ad6b7169203331-01", "x-trace-id": "given-1"}, "given-1"),
    ({"traceparent": "garbage", "x-trace-id": "abc.DEF_1-2"}, "abc.DEF_1-2"),
])
def test_trace_id_is_taken_from_the_request(headers, expected):
    assert trace_id_from(headers) == expected


@pytest.mark.parametrize("headers", [{}, {"x-trace-id": "bad id with spaces"}, {"x-trace-id": "x" * 65}])
def test_trace_id_is_made_when_none_usable(headers):
    made = trace_id_from(headers)
    assert len(made) == 32 and int(made, 16) >= 0
    assert made != trace_id_from(headers)


# -- the frame codec --------------------------------------------------------------------

def _all_frames() -> list[frames.Frame]:
    big = bytes(range(256)) * 100  # a length over two varint bytes
    return [
        frames.request_head("r1", "t1", method="POST", path="/a?b=1", scheme="http", authority="h",
                            headers=[("A", "1"), ("A", "2"), ("B", "x")], end_stream=False, timeout_ms=5000),
        frames.response_head("r1", "t1", status=200, reason="OK", headers=[("Set-Cookie", "a"), ("Set-Cookie", "b")],
                             end_stream=False),
        frames.data("r1", "t1", big, end_stream=True, reply=True),
        frames.data("r1", "t1", b"", end_stream=True, reply=False),
        frames.reset("r1", "t1", "timeout", "no head", reply=False),
        frames.window("r1", "t1", 65536, reply=True),
    ]


def test_batches_round_trip_in_order_with_repeated_headers():
    sent = _all_frames()
    got = frames.decode_batch(frames.join_batch(frames.encode_frame(f) for f in sent))
    assert list(got) == sent
    assert frames.header_list(got[0].headers) == [("A", "1"), ("A", "2"), ("B", "x")]
    assert got[2].data.data == bytes(range(256)) * 100


@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x0a\x7f" + b"x" * 10, b"\x0a\x05\x0a\x03ab"])
def test_garbage_is_a_protocol_error(raw):
    with pytest.raises(frames.ProtocolError):
        frames.decode_batch(raw)


# -- balancing ----------------------------------------------------------------------------

def _cands(*ids: str, unhealthy: dict[str, set] | None = None, inflight: dict[str, int] | None = None,
           local: set[str] = frozenset()) -> list[Candidate]:
    unhealthy, inflight = unhealthy or {}, inflight or {}
    return [Candidate(c, 0, inflight.get(c, 0), frozenset(unhealthy.get(c, ())), object() if c in local else None)
            for c in ids]


def test_round_robin_spreads_evenly():
    b = Balancer()
    picks = collections.Counter(b.pick("g", "round_robin", _cands("a", "b", "c")).client_id for _ in range(300))
    assert picks == {"a": 100, "b": 100, "c": 100}


def test_least_inflight_and_health_and_locality():
    b = Balancer()
    assert b.pick("g", "least_inflight", _cands("a", "b", inflight={"a": 5, "b": 1})).client_id == "b"
    cands = _cands("a", "b", unhealthy={"a": {"web"}})
    assert {b.pick("g", "round_robin", cands, upstream="web").client_id for _ in range(10)} == {"b"}
    # Unhealthy for another upstream does not count; all unhealthy: still served.
    assert {b.pick("g", "round_robin", cands, upstream="api").client_id for _ in range(10)} == {"a", "b"}
    assert b.pick("g", "round_robin", _cands("a", unhealthy={"a": {"web"}}), upstream="web").client_id == "a"
    # A stream this worker owns first; prefer_remote turns that around.
    mixed = _cands("a", "b", local={"b"})
    assert {b.pick("g", "round_robin", mixed).client_id for _ in range(10)} == {"b"}
    assert {b.pick("g", "round_robin", mixed, prefer_remote=True).client_id for _ in range(10)} == {"a"}


def test_consistent_hash_moves_only_the_lost_clients_keys():
    keys = [f"user-{i}" for i in range(200)]
    before = {k: rendezvous(k, ["c1", "c2", "c3"]) for k in keys}
    assert set(before.values()) == {"c1", "c2", "c3"}
    after = {k: rendezvous(k, ["c1", "c3"]) for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "c2"}


def test_server_pool_policies_and_passive_health():
    pool = ServerPool(["s1", "s2"], "round_robin", max_fails=2, fail_timeout=30)
    assert [pool.acquire() for _ in range(4)] == ["s1", "s2", "s1", "s2"]
    pool.report("s1", False)
    assert pool.is_healthy("s1")
    pool.report("s1", False)
    assert not pool.is_healthy("s1") and pool.healthy_servers() == ["s2"]
    pool.set_health("s1", True)
    assert pool.is_healthy("s1")
    least = ServerPool(["s1", "s2"], "least_conn")
    first = least.acquire()
    assert least.acquire() != first
    with pytest.raises(ValueError):
        ServerPool(["s1"], "fastest")


# -- limits ---------------------------------------------------------------------------------

def test_token_bucket_burst_then_retry_after():
    gate = LimitGate(Limits(rate=2.0, burst=3.0))
    verdicts = [gate.admit() for _ in range(4)]
    assert verdicts[:3] == [None, None, None]
    code, wait = verdicts[3]
    assert code == "rate_limited" and 0 < wait <= 0.5 + 1e-6
    time.sleep(wait + 0.01)
    assert gate.admit() is None


def test_inflight_limit_admits_and_releases():
    gate = LimitGate(Limits(max_inflight=2))
    assert gate.admit() is None and gate.admit() is None
    assert gate.admit() == ("overloaded", 1.0)
    gate.release()
    assert gate.admit() is None


def test_rate_is_shared_out_among_workers():
    gate = LimitGate(Limits(rate=10.0, burst=10.0), share=2)
    admitted = sum(gate.admit() is None for _ in range(10))
    assert admitted == 5


# -- gRPC I/O engine -------------------------------------------------------------------

def test_grpc_io_defaults_to_iomgr_and_keeps_other_experiments():
    env = {"GRPC_EXPERIMENTS": "tcp_rcv_lowat"}
    value = choose_grpc_io(False, env)
    assert value == "tcp_rcv_lowat,-event_engine_client,-event_engine_listener"
    assert env["GRPC_EXPERIMENTS"] == value
    assert grpc_io_in_use(env) == "iomgr"
    assert choose_grpc_io(False, env) == value  # applying twice changes nothing


def test_grpc_io_event_engine_leaves_the_environment_alone():
    env: dict[str, str] = {}
    assert choose_grpc_io(True, env) == ""
    assert env == {}
    assert grpc_io_in_use(env) == "event_engine"


def test_grpc_io_an_experiment_the_user_names_is_theirs():
    env = {"GRPC_EXPERIMENTS": "event_engine_client"}
    assert choose_grpc_io(False, env) == "event_engine_client,-event_engine_listener"
    assert grpc_io_in_use(env) == "event_engine"  # the user kept EventEngine for clients
