"""A client spreads its connections over the gateway's workers by itself
(gateway/client/worker_spread.py): real gateway, client and backend."""
from __future__ import annotations

import concurrent.futures
import threading
import time

from tests.harness import Stack, http, streams_by_worker, wait_until


def _spread(stack: Stack, workers: int, expected: int) -> bool:
    counts = streams_by_worker(stack)
    return len(counts) == workers and sum(counts.values()) == expected and min(counts.values()) == 1


def test_four_connections_end_on_four_workers_and_no_request_fails_meanwhile(procs, tmp_path):
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    stack.start_gateway(settings={"workers": 4})
    # Not waiting for the spread, as start_client does: the traffic starts while it goes on.
    client = stack.start_client("c1", extra=["--connections", "4"], wait=False)
    wait_until(lambda: stack.client_status()["connections"] == 4 and stack.routable(), 30,
               what="four connections up", watch=(stack.gateway, client))
    failures: list[str] = []
    stop = threading.Event()

    def traffic(n: int) -> None:
        """Requests both ways all along, some slow enough to be in flight on a stream that moves."""
        i = 0
        while not stop.is_set():
            i += 1
            method = "POST" if i % 2 else "GET"  # a POST is never retried: a lost one shows
            path = f"/slow?ms=300&token=t{n}-{i}" if i % 5 == 0 else f"/echo?n={n}-{i}"
            base = stack.url if n % 2 else stack.local_url("c1")  # ingress, egress
            try:
                r = http(method, base + path, b"x" * 100 if method == "POST" else None, timeout=20)
                if r.status != 200:
                    failures.append(f"{method} {base}{path}: {r.status} {r.body[:200]!r}")
            except Exception as exc:  # a cut connection is a failure too
                failures.append(f"{method} {base}{path}: {exc!r}")

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        runs = [pool.submit(traffic, n) for n in range(6)]
        try:
            wait_until(lambda: _spread(stack, 4, 4), 120, interval=0.5, what="a stream on each of the 4 workers",
                       watch=(stack.gateway, client))
        finally:
            stop.set()
            for run in runs:
                run.result()
    assert not failures, failures[:5]
    placement = stack.client_status()["placement"]
    assert sorted(p["worker"] for p in placement) == ["0", "1", "2", "3"], placement
    # Its own moves never look like a second process with its identity.
    assert "duplicate client identity" not in stack.gateway.output()
    assert client.alive() and "another tunnel-client with this identity" not in client.output()
    # Settled: over more than two of the agent's checks (a second apart) nothing moves.
    moves = sum(p["moves"] for p in placement)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert _spread(stack, 4, 4)
        time.sleep(0.1)
    assert sum(p["moves"] for p in stack.client_status()["placement"]) == moves


def test_no_spread_workers_leaves_the_connections_where_the_kernel_put_them(procs, tmp_path):
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    stack.start_gateway(settings={"workers": 4})
    stack.start_client("c1", extra=["--connections", "4", "--no-spread-workers"])
    first = stack.client_status()["placement"]
    # Three of the agent's checks (a second apart) go by: nothing moves, requests go through.
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        assert http("GET", stack.url + "/echo", timeout=5).status == 200
    later = stack.client_status()["placement"]
    assert [p["worker"] for p in later] == [p["worker"] for p in first]
    assert sum(p["moves"] for p in later) == 0
