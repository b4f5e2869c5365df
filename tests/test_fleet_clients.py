"""Clients know the fleet (issue 18, part 3): a client given node A's address only learns
node B from WELCOME and spreads its two connections over both; node A SIGKILLed: both
connections go to B and requests entering B succeed; A started again: one connection moves
back to A, made before the old one breaks, while a prober through B sees only 200s.

Real processes and a real redis-server; the node helpers are tests/test_fleet.py's. Every
wait polls with a deadline; every process is stopped after the test, passed or failed."""
from __future__ import annotations

import os
import signal
import threading
import time

from tests.harness import free_port, http, wait_until
from tests.test_fleet import A, B, node_row, node_settings


def placement(stack) -> list[str]:
    return [p["node"] or "" for p in stack.client_status("c1")["placement"]]


def groups_on(view_from, node_id: str) -> dict | None:
    row = node_row(view_from, node_id)
    return row["groups"] if row is not None and row["state"] == "serving" else None


class Prober:
    """GETs through one node until stopped, keeping every status (an error is 0)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.statuses.append(http("GET", self.url, timeout=10).status)
            except OSError:
                self.statuses.append(0)
            self._stop.wait(0.02)

    def __enter__(self) -> "Prober":
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def test_client_spreads_fails_over_and_comes_back(redis_server, make_stack):
    peer_port = free_port()
    settings_a = node_settings(redis_server.url, "a", peer_port)
    a = make_stack(host=A, name="gateway-a", settings=settings_a, client=None)
    b = make_stack(host=B, name="gateway-b", like=a, settings=node_settings(redis_server.url, "b", peer_port),
                   client=None)
    wait_until(lambda: groups_on(a, "b") is not None and groups_on(b, "a") is not None, 15,
               what="the nodes see each other", watch=(a.gateway, b.gateway))
    client = a.start_client("c1", wait=False, extra=["--connections", "2"])  # knows node A only
    node_a, node_b = f"{A}:{a.tunnel_port}", f"{B}:{b.tunnel_port}"
    watch = (client, a.gateway, b.gateway)

    # Spread: one connection on each node, as both nodes' /admin/cluster say.
    wait_until(lambda: sorted(placement(a)) == [node_a, node_b], 15, what="one connection on each node", watch=watch)
    wait_until(lambda: groups_on(b, "a") == {"g1": 1} and groups_on(b, "b") == {"g1": 1}
               and groups_on(a, "a") == {"g1": 1} and groups_on(a, "b") == {"g1": 1}, 10,
               what="each node holds one stream", watch=watch)
    assert a.client_status("c1")["nodes"] == [node_a, node_b]

    # Node A killed: both connections on B, and requests entering B succeed within 10 s.
    killed = time.monotonic()
    os.killpg(a.gateway.popen.pid, signal.SIGKILL)
    wait_until(lambda: placement(a) == [node_b, node_b] and http("GET", f"{b.url}/hello", timeout=5).status == 200,
               10, what="both connections on b, b serving the group", watch=(client, b.gateway))
    failed_over = time.monotonic() - killed
    assert all(http("GET", f"{b.url}/hello").status == 200 for _ in range(10))

    # Node A back: within a few seconds one connection moves to it, no request failing meanwhile.
    with Prober(f"{b.url}/hello") as prober:
        restarted = time.monotonic()
        # On the same peer port: the connections the killed node left on it do not stop the claim.
        a.start_gateway(a.gateway_doc(settings=settings_a))
        up = time.monotonic()
        wait_until(lambda: sorted(placement(a)) == [node_a, node_b], 15, what="a connection back on a",
                   watch=(client, a.gateway, b.gateway))
        moved_back = time.monotonic() - up
        # The old stream on B is let go only after the new one serves: B ends with one.
        wait_until(lambda: groups_on(b, "b") == {"g1": 1} and groups_on(b, "a") == {"g1": 1}, 10,
                   what="each node holds one stream again", watch=(client, a.gateway, b.gateway))
        wait_until(lambda: len(prober.statuses) >= 20, 10, what="the prober's requests")
    assert prober.statuses and set(prober.statuses) == {200}, sorted(set(prober.statuses))
    assert moved_back < 8, f"{moved_back:.1f}s"
    assert any(p["moves"] >= 1 for p in a.client_status("c1")["placement"])
    print(f"\nfailover to b {failed_over:.2f}s after the kill; back on a {moved_back:.2f}s after it was up "
          f"({up - restarted:.2f}s to start); {len(prober.statuses)} probes through b, all 200")
