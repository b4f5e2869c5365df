"""Health-aware and consistent-hash balancing over the clients of a group."""
from __future__ import annotations

import json

import pytest

from tests.harness import Stack, get_json, http, wait_until


def _clients(stack: Stack) -> dict[str, dict]:
    """client_id -> summed stream info over its connections."""
    out: dict[str, dict] = {}
    for c in get_json(f"http://127.0.0.1:{stack.admin_port}/admin/clients")["clients"]:
        agg = out.setdefault(c["client_id"], {"served": 0, "unhealthy": set()})
        agg["served"] += c["requests_originated"]
        agg["unhealthy"] |= set(c["unhealthy"])
    return out


def _every_worker_sees(stack: Stack, healthy: bool, what: str, workers: int = 2) -> None:
    """Wait until each worker's own view (the one it balances by) shows c1's
    health as `healthy`: /admin/shards answers from whichever worker the
    connection lands on, so ask until every worker has answered so."""
    agreed: set[int] = set()

    def check() -> bool:
        answer = http("GET", f"http://127.0.0.1:{stack.admin_port}/admin/shards",
                      headers={"Connection": "close"}, timeout=5).json()
        c1 = [c for w in answer["workers"] for c in w["clients"] if c["client_id"] == "c1"]
        if c1 and all((c["unhealthy"] == []) == healthy for c in c1):
            agreed.add(answer["answered_by"])
        return len(agreed) == workers

    wait_until(check, 5, what=what)


@pytest.fixture
def two_clients(procs, tmp_path) -> Stack:
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    groups = {"g1": {
        "tokens": ["test-token"],
        "upstreams": {"web": {"servers": [stack.backend_url], "health_path": "/health", "health_interval": 0.3}},
        "rules": [{"path_prefix": "/", "upstream": "web"}],
    }}
    stack.start_gateway(settings={"workers": 2}, groups=groups)
    stack.start_client("c1")
    stack.start_client("c2")
    return stack


def test_unhealthy_upstream_at_one_client_moves_traffic_and_back(two_clients):
    stack = two_clients
    http("POST", f"{stack.backend_url}/sick?name=tunnel-client%20c1")
    wait_until(lambda: _clients(stack)["c1"]["unhealthy"] == {"web"}, 5, what="c1 reports web unhealthy")
    # Every worker knows it (the shard table carries client health).
    _every_worker_sees(stack, healthy=False, what="c1 unhealthy in every worker's shard table")
    before = _clients(stack)
    for i in range(40):
        r = http("GET", f"{stack.url}/hello", headers={"Connection": "close"})
        assert r.status == 200
    wait_until(lambda: _clients(stack)["c2"]["served"] - before["c2"]["served"] == 40, 3, what="c2 served all")
    assert _clients(stack)["c1"]["served"] == before["c1"]["served"]
    # Restored: c1 gets traffic again.
    http("DELETE", f"{stack.backend_url}/sick?name=tunnel-client%20c1")
    wait_until(lambda: not _clients(stack)["c1"]["unhealthy"], 5, what="c1 healthy again")
    _every_worker_sees(stack, healthy=True, what="c1 healthy in every worker's shard table")
    before = _clients(stack)
    for i in range(40):
        assert http("GET", f"{stack.url}/hello", headers={"Connection": "close"}).status == 200
    wait_until(lambda: _clients(stack)["c1"]["served"] > before["c1"]["served"], 3, what="c1 serves again")
    stack.wait_idle()


def test_consistent_hash_moves_only_the_lost_clients_keys(procs, tmp_path):
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    log = tmp_path / "access.log"
    groups = {"g1": {
        "tokens": ["test-token"], "balance": "consistent_hash", "hash_key": "header:X-User",
        "upstreams": {"web": {"servers": [stack.backend_url]}},
        "rules": [{"path_prefix": "/", "upstream": "web"}],
    }}
    stack.start_gateway(settings={"workers": 2, "access_log": str(log)}, groups=groups)
    for cid in ("c1", "c2", "c3"):
        stack.start_client(cid)

    def owners() -> dict[str, str]:
        ids = {}
        for i in range(200):
            r = http("GET", f"{stack.url}/hello", headers={"X-User": f"user-{i}", "Connection": "close"})
            assert r.status == 200
            ids[r.header("x-request-id")] = f"user-{i}"
        wait_until(lambda: log.exists() and sum(1 for l in log.read_text().splitlines()
                                                if json.loads(l)["request_id"] in ids) == 200, 5, what="access log")
        return {ids[e["request_id"]]: e["client_id"] for e in map(json.loads, log.read_text().splitlines())
                if e["request_id"] in ids}

    first = owners()
    assert set(first.values()) == {"c1", "c2", "c3"}
    assert owners() == first  # stable while nothing changes
    stack.clients["c3"][0].stop()
    # Each worker balances by its own copy of the shard table: wait until every one has dropped c3
    # (a stale copy would still pick c3 and record it, though another client serves the request).
    gone_on: set[int] = set()

    def c3_gone_everywhere() -> bool:
        answer = http("GET", f"http://127.0.0.1:{stack.admin_port}/admin/shards",
                      headers={"Connection": "close"}, timeout=5).json()
        if all(c["client_id"] != "c3" for w in answer["workers"] for c in w["clients"]):
            gone_on.add(answer["answered_by"])
        return len(gone_on) == 2 and stack.routable()

    wait_until(c3_gone_everywhere, 10, what="c3 gone from every worker's table")
    second = owners()
    for key, owner in first.items():
        if owner == "c3":
            assert second[key] in ("c1", "c2")
        else:
            assert second[key] == owner, f"{key} moved from {owner} to {second[key]}"


def test_gateway_forward_upstreams_are_health_checked(procs, tmp_path):
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port here
    stack.start_gateway(upstreams={"backend": {"servers": [dead, stack.backend_url], "health_path": "/health",
                                               "health_interval": 0.3}})
    stack.start_client("c1")
    # After the first check, egress never goes to the dead server.
    wait_until(lambda: all(http("GET", f"{stack.local_url()}/hello").status == 200 for _ in range(6)), 5,
               what="egress avoids the dead server")
    for _ in range(20):
        assert http("GET", f"{stack.local_url()}/hello").status == 200


def test_passive_health_takes_a_failing_server_out(procs, tmp_path):
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    groups = {"g1": {
        "tokens": ["test-token"],
        "upstreams": {"web": {"servers": ["http://127.0.0.1:9", stack.backend_url], "max_fails": 1,
                              "fail_timeout": 30.0}},
        "rules": [{"path_prefix": "/", "upstream": "web"}],
    }}
    stack.start_gateway(groups=groups)
    stack.start_client("c1", extra=["--connections", "1"])
    statuses = [http("GET", f"{stack.url}/hello").status for _ in range(12)]
    # At most the first try reaches the dead server; after that it is out.
    assert statuses.count(502) <= 1 and statuses[-10:] == [200] * 10
