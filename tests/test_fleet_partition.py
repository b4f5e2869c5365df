"""A network partition between two nodes of the fleet (issue 18): requests for the far
node's groups fail over or get 502/503 within the peer heartbeat, never hang.

The partition is real: node A runs in a network namespace of its own, linked to the
root namespace by a veth pair on private addresses (10.213.N.1/30 on the root side,
10.213.N.2/30 in the namespace); `ip link set VETH down` on the root side cuts the
link, `up` heals it (this kernel has no netem); meanwhile a blackhole route (of a
higher metric than the link's) drops what the root namespace sends to the namespace,
silently, as a cut cable would, instead of letting it take the default route out. Node B, Redis and the test run in
the root namespace on the root-side address; node A, client c1 of group g1 (on A
only: --no-learn-fleet) and its backend run in the namespace. Two backends, one in
each namespace, listen on 127.0.0.1 on the same port, so the group's one upstream
address is a backend on each side of the cut. Nothing is sent anywhere but to
loopback and the namespace.

* cut under a slow GET and a slow POST entering B for A's client: both end within
  the heartbeat (502 `tunnel_closed` or 503), new requests on B get 503
  `no_client_available`, B's /admin/cluster shows A unreachable or gone;
* the same with a second client c2 of g1 on B (started once the requests are in
  flight, as B prefers its own streams): the GET is retried on c2 (200), the POST
  gets 502;
* healed: A and B see each other again and B reaches c1 on A again, and no
  request is left in any pending table.

Namespaces need root: without it (or without a working `ip netns`) the tests are
skipped, saying why. Every wait polls with a deadline; every process is stopped
and the namespace (with its veth) removed after the module, also when a test fails."""
from __future__ import annotations

import concurrent.futures
import ipaddress
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Iterator

import pytest

from tests.harness import ProcGroup, Stack, free_port, get_json, http, wait_until
from tests.redis_server import RedisServer
from tests.test_fleet import TTL, cluster, node_row, node_settings, sees_client

ADMIN_TOKEN = "partition-admin-token"  # an admin port off loopback needs one (the nodes' are on the veth)
BOUND = 6.0  # a request in flight over a cut link ends within this (heartbeat 2 s + margin)
SLOW_MS = 30_000  # the backend's answer to a request that must not be waited for


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network on an address or a route of the root namespace."""
    nets = []
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("local", "broadcast", "unicast") and len(line.split()) > 1:
            first = line.split()[1]
        if first and first != "default":
            try:
                nets.append(ipaddress.ip_network(first, strict=False))
            except ValueError:
                pass
    return nets


@dataclass
class Net:
    """The namespace and its veth pair: `cut()` and `heal()` the link (on the root side)."""
    ns: str
    veth: str  # the root side's end
    root_addr: str
    ns_addr: str

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def cut(self) -> float:
        _ip("link", "set", self.veth, "down")
        return time.monotonic()

    def heal(self) -> float:
        _ip("link", "set", self.veth, "up")
        return time.monotonic()

    def is_up(self) -> bool:
        flags = _ip("-o", "link", "show", "dev", self.veth).stdout.partition("<")[2].partition(">")[0]
        return "UP" in flags.split(",")


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    pid = os.getpid()
    ns, veth, peer = f"tgw-part-{pid}", f"tgwp{pid}r", f"tgwp{pid}n"
    used = _used_networks()
    candidates = [n for n in range(1, 255)
                  if not any(ipaddress.ip_network(f"10.213.{n}.0/30").overlaps(u) for u in used)]
    if not candidates:
        pytest.skip("no free 10.213.N.0/30 network for the veth pair")
    n = random.choice(candidates)
    root_addr, ns_addr = f"10.213.{n}.1", f"10.213.{n}.2"
    made = _ip("netns", "add", ns, check=False)
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` failed: {made.stderr.strip()}")
    try:
        for args in (("link", "add", veth, "type", "veth", "peer", "name", peer, "netns", ns),
                     ("addr", "add", f"{root_addr}/30", "dev", veth),
                     ("link", "set", veth, "up"),
                     ("-n", ns, "addr", "add", f"{ns_addr}/30", "dev", peer),
                     ("-n", ns, "link", "set", peer, "up"),
                     ("-n", ns, "link", "set", "lo", "up"),
                     # While the link is down its connected route is gone: without this, what
                     # the root namespace sends to the namespace would take the default route
                     # out of the host. Dropped silently instead, as on a cut cable.
                     ("route", "add", "blackhole", f"10.213.{n}.0/30", "metric", "4242")):
            _ip(*args)
        yield Net(ns, veth, root_addr, ns_addr)
    finally:
        _ip("route", "del", "blackhole", f"10.213.{n}.0/30", "metric", "4242", check=False)
        _ip("link", "del", veth, check=False)  # the pair goes with either end
        _ip("netns", "del", ns, check=False)


class Fleet:
    def __init__(self, net: Net, a: Stack, b: Stack, backend_ns: ProcGroup) -> None:
        self.net, self.a, self.b, self.backend_ns = net, a, b, backend_ns

    def ns_backend_stats(self) -> dict:
        """The backend's in the namespace (c1's): `inflight`, `cancelled`, ..."""
        return get_json(f"http://{self.net.ns_addr}:{self.a.backend_port}/stats", timeout=2)

    def ns_backend_inflight(self) -> int:
        """Requests the backend in the namespace (c1's) is answering."""
        return self.ns_backend_stats()["inflight"]

    def whole(self, timeout: float = 30.0) -> None:
        """Both nodes serving and seeing each other, c1's streams routable from B."""
        wait_until(lambda: sees_client(self.b, {"g1": 2}) and (node_row(self.a, "b") or {}).get("state") == "serving"
                   and cluster(self.a)["registry_up"] and cluster(self.b)["registry_up"],
                   timeout, what="the fleet whole again", watch=(self.a.gateway, self.b.gateway))


class _AdminAuth(urllib.request.BaseHandler):
    """Adds the admin token to every admin request to the nodes (the harness's helpers reach
    their admin ports through urllib, without headers of their own)."""

    def __init__(self, hosts: tuple[str, ...]) -> None:
        self.hosts = hosts

    def http_request(self, req: urllib.request.Request) -> urllib.request.Request:
        host, path = req.host.rpartition(":")[0], urllib.request.urlparse(req.full_url).path
        if host in self.hosts and path.startswith(("/admin/", "/metrics")) and not req.has_header("Authorization"):
            req.add_unredirected_header("Authorization", f"Bearer {ADMIN_TOKEN}")
        return req


@pytest.fixture(scope="module")
def fleet(net, make_module_stack, tmp_path_factory) -> Iterator[Fleet]:
    redis = RedisServer(tmp_path_factory.mktemp("redis"), host=net.root_addr)  # reachable from both sides
    urllib.request.install_opener(urllib.request.build_opener(_AdminAuth((net.root_addr, net.ns_addr))))
    try:
        redis.start()
        peer_port = free_port()
        settings = {"admin_token": ADMIN_TOKEN}
        # Node B and the root namespace's backend, on the root side of the veth.
        b = make_module_stack(host=net.root_addr, name="gateway-b", client=None,
                              settings={**node_settings(redis.url, "b", peer_port), **settings})
        # Node A in the namespace, the same ports on its own address, with a backend of its own
        # there on the same loopback port (its readiness checked through the veth).
        a = Stack(b.procs, b.tmp / "node-a", host=net.ns_addr, name="gateway-a", prefix=net.prefix)
        a.tmp.mkdir(exist_ok=True)
        for key in ("backend_port", "http_port", "tunnel_port", "admin_port", "grpc_port"):
            setattr(a, key, getattr(b, key))
        backend_ns = a.procs.start("backend-ns", [*net.prefix, sys.executable, "scripts/demo_backend.py", "--host",
                                                  "0.0.0.0", "--port", str(a.backend_port)])
        fleet = Fleet(net, a, b, backend_ns)
        wait_until(lambda: fleet.ns_backend_inflight() == 0, what="backend in the namespace", watch=backend_ns)
        a.start_gateway(a.gateway_doc(settings={**node_settings(redis.url, "a", peer_port), **settings}))
        # c1 in the namespace, on node A only (its status port is the namespace's loopback:
        # readiness is read from the nodes instead).
        a.start_client("c1", wait=False, extra=["--no-learn-fleet"])
        wait_until(lambda: a.routable() and a.streams() == 2, 20, what="c1 on node a",
                   watch=(a.gateway, a.clients["c1"][0]))
        fleet.whole()
        yield fleet
    finally:
        redis.stop()
        urllib.request.install_opener(None)


@pytest.fixture
def whole(fleet) -> Iterator[Fleet]:
    """The fleet with the link up, before and after the test (healed then, also when it failed)."""
    fleet.whole()
    yield fleet
    if not fleet.net.is_up():
        fleet.net.heal()
    fleet.whole()


def _no_client_on_b(fleet: Fleet) -> bool:
    r = http("GET", f"{fleet.b.url}/hello", timeout=BOUND)
    assert r.status in (200, 502, 503), r.body[:300]
    return r.status == 503 and r.json()["error"] == "no_client_available"


def _a_lost_on_b(fleet: Fleet) -> bool:
    row = node_row(fleet.b, "a")
    return row is None or row["state"] == "unreachable"


def test_cut_under_requests_through_b(whole):
    fleet = whole
    b = fleet.b
    for _ in range(10):
        r = http("GET", f"{b.url}/hello", timeout=10)
        assert r.status == 200 and len(r.body) == 100, r.body[:300]
    assert http("POST", f"{b.url}/echo/x", b"abc", timeout=10).json()["size"] == 3
    assert node_row(b, "b")["groups"] == {}  # B holds no stream: all of that crossed the link

    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        get = pool.submit(http, "GET", f"{b.url}/slow?ms={SLOW_MS}", timeout=30)
        post = pool.submit(http, "POST", f"{b.url}/slow?ms={SLOW_MS}", b"x" * 1024, timeout=30)
        wait_until(lambda: fleet.ns_backend_inflight() >= 2, 10, what="two requests in flight at c1's backend")
        cancelled = fleet.ns_backend_stats()["cancelled"]
        log_before = len(fleet.a.gateway.output())
        cut = fleet.net.cut()
        ended, statuses = {}, {}
        for name, fut in (("GET", get), ("POST", post)):
            r = fut.result(timeout=BOUND + 5)
            ended[name] = time.monotonic() - cut
            statuses[name] = f"{r.status} {r.json().get('error')}"
            assert r.status in (502, 503), (name, r.status, r.body[:300])
            if r.status == 502:
                assert r.json()["error"] == "tunnel_closed", r.body[:300]
    finally:
        pool.shutdown(wait=False)
    assert max(ended.values()) < BOUND, f"requests in flight took {ended} to end"

    wait_until(lambda: _no_client_on_b(fleet), BOUND, what="503 no_client_available on b")
    refused = time.monotonic() - cut
    started = time.monotonic()
    r = http("GET", f"{b.url}/hello", timeout=BOUND)
    assert r.status == 503 and time.monotonic() - started < 1, "a refusal must be quick"
    wait_until(lambda: _a_lost_on_b(fleet), BOUND, what="a unreachable or gone in b's /admin/cluster")
    lost = time.monotonic() - cut
    wait_until(lambda: node_row(fleet.b, "a") is None, TTL * 1.5 + 3, what="a's lease gone from b's view")
    gone = time.monotonic() - cut
    assert refused < BOUND and lost < BOUND
    # Once A lost B too (its log; healed sooner, B tells A when it hears it again: see
    # test_short_cut_leaves_nothing_running_on_a), A gave up the two requests of the node it
    # lost and c1 cancelled their upstream calls (seen at c1's backend, which the test reaches
    # through the link again), long before the backend would have answered them.
    wait_until(lambda: '"peer node lost"' in fleet.a.gateway.output()[log_before:], BOUND, what="a lost b (its log)",
               watch=fleet.a.gateway)
    fleet.net.heal()
    wait_until(lambda: fleet.ns_backend_stats()["inflight"] == 0, 10, what="c1's backend idle")
    abandoned = time.monotonic() - cut
    assert fleet.ns_backend_stats()["cancelled"] >= cancelled + 2 and abandoned < SLOW_MS / 1000 / 2
    print(f"\npartition under GET+POST through b: GET ended after {ended['GET']:.2f}s ({statuses['GET']}), POST "
          f"after {ended['POST']:.2f}s ({statuses['POST']}); new requests 503 after {refused:.2f}s; a unreachable "
          f"on b after {lost:.2f}s, gone after {gone:.2f}s; both upstream calls cancelled at c1 "
          f"(seen {abandoned:.2f}s after the cut, once healed)")


def test_cut_fails_over_to_a_client_on_b(whole):
    fleet = whole
    b = fleet.b
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        get = pool.submit(http, "GET", f"{b.url}/slow?ms=1500&token=retried", timeout=30)
        post = pool.submit(http, "POST", f"{b.url}/slow?ms={SLOW_MS}", b"x" * 1024, timeout=30)
        wait_until(lambda: fleet.ns_backend_inflight() >= 2, 10, what="two requests in flight at c1's backend")
        # Another client of g1, on node B only (the root namespace's backend): where the GET can go again
        # (up before the GET ends: not waiting for it to spread over b's workers).
        b.start_client("c2", extra=["--no-learn-fleet", "--no-spread-workers"])
        cut = fleet.net.cut()
        r = post.result(timeout=BOUND + 5)
        post_after = time.monotonic() - cut
        assert r.status == 502 and r.json()["error"] == "tunnel_closed", r.body[:300]
        r = get.result(timeout=BOUND + 5)
        get_after = time.monotonic() - cut
        assert r.status == 200 and r.body == b"retried", r.body[:300]
        assert post_after < BOUND and get_after < BOUND + 1.5, (post_after, get_after)
        for _ in range(10):  # B's own client answers at once
            assert http("GET", f"{b.url}/hello", timeout=5).status == 200
    finally:
        pool.shutdown(wait=False)
        if "c2" in b.clients:
            b.clients.pop("c2")[0].stop()
    print(f"\npartition with c2 on b: POST in flight 502 after {post_after:.2f}s; GET in flight retried on c2, "
          f"200 after {get_after:.2f}s (1.5 s of it the backend's)")


@pytest.mark.parametrize("length", ["short", "long"])
def test_heal(whole, length):
    """short: healed as soon as B finds A unreachable (A's record may still be in B's copy of
    the registry, or its lease expired already); long: once A's lease expired and it left B's
    view, and A lost B too and found Redis unreachable (its log says so: A is out of the
    test's reach)."""
    fleet = whole
    a, b = fleet.a, fleet.b
    log_before = len(a.gateway.output())
    cut = fleet.net.cut()
    if length == "short":
        wait_until(lambda: _a_lost_on_b(fleet), BOUND, what="a unreachable in b's view", interval=0.02)
        row = node_row(b, "a")
        how = "unreachable" if row else "gone"
    else:
        wait_until(lambda: node_row(b, "a") is None, TTL * 1.5 + BOUND, what="a gone from b's view")
        wait_until(lambda: _no_client_on_b(fleet), BOUND, what="503 on b")
        said = ('"peer node lost"', '"Redis unreachable')
        wait_until(lambda: all(m in a.gateway.output()[log_before:] for m in said), BOUND * 2,
                   what="a lost b and Redis (its log)", watch=a.gateway)
        how = "gone"
    healed = fleet.net.heal()
    cut_for = healed - cut

    def reaches_c1() -> bool:
        r = http("GET", f"{b.url}/hello", timeout=5)
        assert r.status in (200, 502, 503), r.body[:300]
        return r.status == 200

    wait_until(lambda: (node_row(b, "a") or {}).get("state") == "serving", 30, what="a serving in b's view")
    seen_by_b = time.monotonic() - healed
    wait_until(lambda: (node_row(a, "b") or {}).get("state") == "serving", 30, what="b serving in a's view")
    seen_by_a = time.monotonic() - healed
    wait_until(reaches_c1, 30, what="b reaches c1 on a again")
    served = time.monotonic() - healed
    for _ in range(10):
        assert http("GET", f"{b.url}/hello", timeout=5).status == 200
    # Nothing is left over from the cuts: every pending table of both nodes is empty (c1's
    # status port is the namespace's loopback, out of the test's reach: the nodes' tables).
    wait_until(lambda: not any(st["pending"] or st["serving"] for st in (a.status(), b.status())), 15,
               what="the nodes' pending tables empty", watch=(a.gateway, b.gateway))
    idle = time.monotonic() - healed
    print(f"\nhealed after a {cut_for:.2f}s cut (a {how} on b): a serving in b's view after {seen_by_b:.2f}s, "
          f"b in a's after {seen_by_a:.2f}s, b reaches c1 after {served:.2f}s, pending tables empty after {idle:.2f}s")
    assert served < 15, f"b reached c1 only {served:.2f}s after the link came back"




def test_short_cut_leaves_nothing_running_on_a(whole):
    """Healed as soon as B gave A up, before A noticed: B failed its request through A (502),
    and once A is heard again B tells it so (its workers are LOST to A, as after a restart),
    so A and c1 stop serving a request whose caller got its 502, long before the backend
    would have answered it."""
    fleet = whole
    b = fleet.b
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        get = pool.submit(http, "GET", f"{b.url}/slow?ms={SLOW_MS}", timeout=30)
        wait_until(lambda: fleet.ns_backend_inflight() >= 1, 10, what="a request in flight at c1's backend")
        cancelled = fleet.ns_backend_stats()["cancelled"]
        cut = fleet.net.cut()
        wait_until(lambda: _a_lost_on_b(fleet), BOUND, what="a unreachable in b's view", interval=0.02)
        fleet.net.heal()
        r = get.result(timeout=BOUND)
        assert r.status == 502 and r.json()["error"] == "tunnel_closed", r.body[:300]
    finally:
        pool.shutdown(wait=False)
    wait_until(lambda: fleet.ns_backend_stats()["inflight"] == 0, 10, what="c1's backend idle")
    idle = time.monotonic() - cut
    assert fleet.ns_backend_stats()["cancelled"] >= cancelled + 1 and idle < SLOW_MS / 1000 / 2
    wait_until(lambda: not any(st["pending"] or st["serving"] for st in (fleet.a.status(), b.status())), 15,
               what="the nodes' pending tables empty")
    print(f"\nshort cut under a request through b: 502 on b, the upstream call at c1 cancelled "
          f"{idle:.2f}s after the cut")
