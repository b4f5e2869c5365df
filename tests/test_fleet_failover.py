"""Request-level failover across nodes (issue 18 part 4): node A and node B with a
real redis-server; client c1 connected to A only. A GET and a POST enter node B and
go to c1 through A; then c2 connects to B and node A is SIGKILLed with both in
flight. The GET is retried on c2 and succeeds (the access log of B says
"retried"); the POST gets 502 `tunnel_closed` within the peer heartbeat; new
requests succeed through B at once; A leaves B's view when its lease expires.

Every wait polls with a deadline; every process is stopped after the test, also
when it fails."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import orjson

from tests.harness import free_port, get_json, http, wait_until
from tests.test_fleet import A, B, TTL, node_row, node_settings, sees_client


def test_node_killed_under_requests_in_flight(redis_server, make_stack, tmp_path):
    peer_port = free_port()
    log = tmp_path / "b-access.log"
    a = make_stack(host=A, name="gateway-a", settings=node_settings(redis_server.url, "a", peer_port), client=None)
    b = make_stack(host=B, name="gateway-b", like=a, client=None,
                   settings={**node_settings(redis_server.url, "b", peer_port), "access_log": str(log)})
    a.start_client("c1", extra=["--no-learn-fleet"])
    wait_until(lambda: sees_client(b, {"g1": 2}), 15, what="node b sees a's client", watch=(a.gateway, b.gateway))

    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        get = pool.submit(http, "GET", f"{b.url}/slow?ms=1500&token=retried", timeout=30)
        post = pool.submit(http, "POST", f"{b.url}/slow?ms=20000", b"x" * 1024, timeout=30)
        wait_until(lambda: get_json(f"{a.backend_url}/stats")["inflight"] >= 2, 10, what="two requests in flight")
        # Another client of g1, on node B only: where the GET can go again (up before the GET
        # ends: not waiting for it to spread over b's workers).
        b.start_client("c2", extra=["--no-learn-fleet", "--no-spread-workers"])
        killed = time.monotonic()
        os.killpg(a.gateway.popen.pid, signal.SIGKILL)
        r = post.result(timeout=15)
        post_after = time.monotonic() - killed
        assert r.status == 502 and r.json()["error"] == "tunnel_closed", r.body[:300]
        r = get.result(timeout=15)
        get_after = time.monotonic() - killed
        assert r.status == 200 and r.body == b"retried", r.body[:300]
    finally:
        pool.shutdown(wait=False)
    assert post_after < 5, f"the POST in flight took {post_after:.2f}s to fail"
    rid = r.header("x-request-id")

    def logged() -> dict | None:
        rows = [orjson.loads(x) for x in log.read_bytes().splitlines() if x.strip()]
        return next((row for row in rows if row["request_id"] == rid), None)

    wait_until(lambda: logged() is not None, 5, what="the GET's access line on b")
    line = logged()
    assert line["retried"] is True and line["client_id"] == "c2" and line["status"] == 200, line
    for _ in range(10):
        assert http("GET", f"{b.url}/hello", timeout=5).status == 200
    wait_until(lambda: node_row(b, "a") is None, TTL * 1.5 + 3, what="node a gone from b's /admin/cluster")
    gone_after = time.monotonic() - killed
    print(f"\nnode a killed: POST in flight 502 after {post_after:.2f}s; GET in flight retried on c2 through b, "
          f"answered after {get_after:.2f}s (1.5 s of it the backend's); a gone from b's view after {gone_after:.2f}s")
