"""A rolling restart of the fleet under load (issue 18, part 5): nodes A (127.0.0.2) and B
(127.0.0.3), one client with two connections given both addresses, and a prober sending
requests through both nodes' HTTP entries. Node A gets SIGTERM (it marks itself draining in
the registry, then its clients move to B and its in-flight requests finish), is started again
and gets a connection back; then the same with B. Not one request fails.

A node that stopped listening refuses the prober's connection: nothing was sent, and as a
load balancer would, the prober takes that entry out of its rotation and sends the request
through the other node (counted apart); the test puts the node back once the client has a
connection on it again. Real processes and a real redis-server (tests/test_fleet.py's helpers)."""
from __future__ import annotations

import itertools
import signal
import threading
import time

from tests.harness import free_port, http, wait_until
from tests.test_fleet import A, B, node_settings
from tests.test_fleet_clients import Prober, groups_on, placement


class RollingProber(Prober):
    """GETs through the entries in rotation, in turn, until stopped (the Prober's thread)."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(urls[0])
        self.rotation = list(urls)
        self.ok = 0
        self.failed: list[str] = []  # what went wrong, per failed request
        self.refused = 0  # connections refused by a stopped node (sent again through another)
        self._lock = threading.Lock()

    def put_back(self, url: str) -> None:
        with self._lock:
            if url not in self.rotation:
                self.rotation.append(url)

    def _run(self) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            with self._lock:
                entries = self.rotation[n % len(self.rotation):] + self.rotation[:n % len(self.rotation)]
            self._probe(entries)
            self._stop.wait(0.01)

    def _probe(self, entries: list[str]) -> None:
        for url in entries:
            try:
                status = http("GET", f"{url}/hello", timeout=10).status
            except OSError as exc:
                if not isinstance(getattr(exc, "reason", exc), ConnectionRefusedError):
                    self.failed.append(f"{url}: {exc!r}")
                    return
                self.refused += 1
                with self._lock:
                    if len(self.rotation) > 1 and url in self.rotation:
                        self.rotation.remove(url)
                continue
            if status == 200:
                self.ok += 1
            else:
                self.failed.append(f"{url}: {status}")
            return
        self.failed.append("no entry took the connection")


def test_rolling_restart_under_load_loses_no_request(redis_server, make_stack):
    peer_port = free_port()
    settings = {n: node_settings(redis_server.url, n, peer_port) for n in ("a", "b")}
    a = make_stack(host=A, name="gateway-a", settings=settings["a"], client=None)
    b = make_stack(host=B, name="gateway-b", like=a, settings=settings["b"], client=None)
    stacks = {"a": a, "b": b}
    wait_until(lambda: groups_on(a, "b") is not None and groups_on(b, "a") is not None, 15,
               what="the nodes see each other", watch=(a.gateway, b.gateway))
    address = {"a": f"{A}:{a.tunnel_port}", "b": f"{B}:{b.tunnel_port}"}
    client = a.start_client("c1", wait=False, extra=["--server", f"{address['a']},{address['b']}",
                                                     "--connections", "2"])
    both = sorted(address.values())
    wait_until(lambda: sorted(placement(a)) == both and groups_on(a, "b") == {"g1": 1}
               and groups_on(b, "a") == {"g1": 1}, 15, what="one connection on each node",
               watch=(client, a.gateway, b.gateway))

    steps = []
    with RollingProber([a.url, b.url]) as prober:
        wait_until(lambda: prober.ok >= 20, 10, what="the prober's first requests")
        for name, other in (("a", "b"), ("b", "a")):
            node, rest = stacks[name], stacks[other]
            began = time.monotonic()
            node.gateway.popen.send_signal(signal.SIGTERM)
            # Its clients move to the other node; it stops within the grace, cleanly.
            assert node.gateway.popen.wait(30) == 0
            stopped = time.monotonic()
            wait_until(lambda: placement(a) == [address[other]] * 2, 10,
                       what=f"both connections on {other}", watch=(client, rest.gateway))
            node.start_gateway(node.gateway_doc(settings=settings[name]))
            up = time.monotonic()
            wait_until(lambda: sorted(placement(a)) == both and groups_on(node, other) == {"g1": 1}
                       and groups_on(node, name) == {"g1": 1} and groups_on(rest, name) == {"g1": 1}, 20,
                       what=f"a connection back on {name}", watch=(client, node.gateway, rest.gateway))
            back = time.monotonic()
            prober.put_back(node.url)
            steps.append((name, stopped - began, up - stopped, back - up, back - began))
        ok_before = prober.ok
        wait_until(lambda: prober.ok >= ok_before + 20, 10, what="requests through the restarted nodes")
    timings = "; ".join(f"{n}: stopped in {s:.2f}s, up in {u:.2f}s, connection back {c:.2f}s later "
                        f"({t:.2f}s in all)" for n, s, u, c, t in steps)
    print(f"\nrolling restart: {prober.ok} requests 200, {len(prober.failed)} failed, {prober.refused} refused "
          f"connections sent through the other node; {timings}")
    assert not prober.failed, sorted(set(prober.failed))
