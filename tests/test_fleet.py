"""The fleet (issue 18): two gateway nodes, A on 127.0.0.2 and B on 127.0.0.3 (the
same ports), a real redis-server, and one client connected to node A only. A
request entering node B reaches that client through the routers' peer link: HTTP,
a 64 MiB body both ways, WebSocket, SSE, the gRPC entry. /admin/cluster on both
nodes; Redis stopped and started under them; node A SIGKILLed: on B its requests
fail at once and new ones get 503, never a hang. Without `cluster`, /admin/cluster
shows the one host.

Every wait polls with a deadline; every process is stopped after the module
(make_module_stack), also when a test fails."""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest
import zmq

from gateway.cluster.config import ClusterSettings
from gateway.router import envelope as env
from gateway.router.broker import Broker
from gateway.router.cluster import Cluster

from tests.harness import ROOT, Stack, free_port, get_json, http, to_toml, wait_until
from tests.test_bodies import _download, _upload
from tests.test_grpc_entry import echo_gen  # noqa: F401  (a fixture: the echo service's generated code)
from tests.test_streaming import _events
from tests.test_websocket import _echo_many, _ws_url

A, B = "127.0.0.2", "127.0.0.3"
TTL = 2.0  # node_ttl: a killed node's lease is gone within 1.5 x this
PREFIX = "fleet-test"
ECHO = Path(__file__).resolve().parent / "grpc_echo" / "server.py"


class Fleet:
    def __init__(self, a: Stack, b: Stack, peer_port: int, redis) -> None:
        self.a, self.b, self.peer_port, self.redis = a, b, peer_port, redis


def node_settings(redis_url: str, node_id: str, peer_port: int) -> dict:
    return {"workers": 2, "cluster": redis_url, "cluster_prefix": PREFIX, "node_id": node_id,
            "peer_port": peer_port, "node_ttl": TTL}


def cluster(stack: Stack) -> dict:
    return get_json(f"{stack.admin_url}/admin/cluster")


def node_row(stack: Stack, node_id: str) -> dict | None:
    return next((n for n in cluster(stack)["nodes"] if n["node_id"] == node_id), None)


def metric(stack: Stack, name: str, labels: str = "") -> float | None:
    """A sample of /metrics (the sum of its lines when `labels` selects several)."""
    text = http("GET", f"{stack.admin_url}/metrics").body.decode()
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*{labels}[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values) if values else None


def sees_client(stack: Stack, groups: dict) -> bool:
    row = node_row(stack, "a")
    return row is not None and row["state"] == "serving" and row["groups"] == groups


@pytest.fixture(scope="module")
def fleet(redis_server, make_module_stack, echo_gen) -> Fleet:  # noqa: F811  (echo_gen: the fixture)
    echo_port, peer_port = free_port(), free_port()

    def routes(stack: Stack, doc: dict) -> None:
        doc["groups"]["g1"]["upstreams"]["grpc"] = {"servers": [f"http://127.0.0.1:{echo_port}"]}
        doc["groups"]["g1"]["rules"].insert(0, {"path_prefix": "/echo.v1.Echo", "upstream": "grpc"})
        doc["grpc_routes"] = [{"match_service": "echo.", "group": "g1", "timeout": 10.0}]

    a = make_module_stack(host=A, name="gateway-a", settings=node_settings(redis_server.url, "a", peer_port),
                          edit=routes, client=None)
    b = make_module_stack(host=B, name="gateway-b", like=a, settings=node_settings(redis_server.url, "b", peer_port),
                          edit=routes, client=None)
    echo = a.procs.start("grpc-echo", [sys.executable, str(ECHO), str(echo_gen[0]), str(echo_port)])
    # --server 127.0.0.2:PORT and not learning the fleet: it stays on node A only
    a.start_client("c1", extra=["--no-learn-fleet"])

    async def echo_up() -> bool:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}") as ch:
            await asyncio.wait_for(ch.channel_ready(), 1)
            return True

    wait_until(lambda: asyncio.run(echo_up()), 15, what="grpc echo server", watch=echo)
    wait_until(lambda: sees_client(b, {"g1": 2}), 15, what="node b sees a's client", watch=(a.gateway, b.gateway))
    return Fleet(a, b, peer_port, redis_server)


def test_a_request_entering_b_reaches_the_client_on_a(fleet):
    out_before = metric(fleet.b, "tunnel_cross_node_batches_total", 'flow="out"') or 0
    for _ in range(20):
        r = http("GET", f"{fleet.b.url}/hello")
        assert r.status == 200 and len(r.body) == 100, r.body[:300]
    assert http("POST", f"{fleet.b.url}/echo/x", b"abc").json()["sha256"] == hashlib.sha256(b"abc").hexdigest()
    # Through the peer link: B's workers sent batches to another node's, A's received them.
    wait_until(lambda: (metric(fleet.b, "tunnel_cross_node_batches_total", 'flow="out"') or 0) > out_before
               and (metric(fleet.a, "tunnel_cross_node_batches_total", 'flow="in"') or 0) > 0,
               5, what="cross-node batches counted")
    assert node_row(fleet.b, "b")["groups"] == {}  # B holds no stream itself


def test_64_mib_both_ways_through_b(fleet):
    big = 64 << 20
    data = os.urandom(big)

    async def main():
        return await asyncio.gather(_upload(f"{fleet.b.url}/echo/up", data), _download(f"{fleet.b.url}/bytes/{big}"))

    started = time.monotonic()
    (status, echo), down = asyncio.run(main())
    took = time.monotonic() - started
    assert status == 200 and (echo["sha256"], echo["size"]) == (hashlib.sha256(data).hexdigest(), big)
    assert down == (200, str(big), hashlib.sha256(b"\xab" * big).hexdigest(), big)
    print(f"\n64 MiB up and 64 MiB down at once through node b -> a: {took:.2f}s")


def test_websocket_through_b(fleet):
    asyncio.run(asyncio.wait_for(_echo_many(_ws_url(fleet.b.url), 60, seed=18), 30))


def test_sse_through_b(fleet):
    events = asyncio.run(_events(f"{fleet.b.url}/sse?n=10&ms=100"))
    assert len(events) == 10
    assert max(seen - sent for sent, seen in events) < 0.5  # each as it is sent, not collected


def test_grpc_entry_through_b(fleet, echo_gen):  # noqa: F811
    gen, pb, pb_grpc = echo_gen

    async def main():
        async with grpc.aio.insecure_channel(f"{B}:{fleet.b.grpc_port}") as channel:
            stub = pb_grpc.EchoStub(channel)
            call = stub.Unary(pb.Msg(text="hi"), metadata=(("x-caller", "b"),))
            assert (await call).text == "hi"
            assert dict(await call.trailing_metadata())["x-caller"] == "b"
            bidi = stub.Bidi()
            for i in range(10):
                await bidi.write(pb.Msg(text=f"m{i}", count=i))
                assert (await bidi.read()).text == f"M{i}"  # one by one, through two nodes
            await bidi.done_writing()
            assert await bidi.read() is grpc.aio.EOF

    asyncio.run(asyncio.wait_for(main(), 30))


def test_admin_cluster_on_both_nodes(fleet):
    peer_port = fleet.peer_port
    for stack, own in ((fleet.a, "a"), (fleet.b, "b")):
        view = cluster(stack)
        assert view["node_id"] == own and view["registry_up"] is True
        nodes = {n["node_id"]: n for n in view["nodes"]}
        assert set(nodes) == {"a", "b"}
        assert nodes["a"]["groups"] == {"g1": 2} and nodes["b"]["groups"] == {}
        assert nodes["a"]["address"] == f"{A}:{fleet.a.tunnel_port}" and nodes["b"]["peer"] == f"tcp://{B}:{peer_port}"
        assert all(n["state"] == "serving" and n["started"] > 0 and n["last_seen"] > 0 for n in nodes.values())
    assert metric(fleet.b, "tunnel_cluster_registry_up") == 1
    assert metric(fleet.b, "tunnel_cluster_nodes", 'state="serving"') == 2


def test_redis_lost_and_back(fleet):
    redis = fleet.redis
    try:
        redis.stop()
        for stack in (fleet.a, fleet.b):
            wait_until(lambda: metric(stack, "tunnel_cluster_registry_up") == 0, 10, what="registry_up 0")
        assert cluster(fleet.b)["registry_up"] is False
        # Served from the last copy of the fleet: b still reaches a's client.
        for _ in range(10):
            assert http("GET", f"{fleet.b.url}/hello").status == 200
        assert sees_client(fleet.b, {"g1": 2})
    finally:
        redis.start()  # same port, no data: every node re-registers
    for stack in (fleet.a, fleet.b):
        wait_until(lambda: metric(stack, "tunnel_cluster_registry_up") == 1 and cluster(stack)["registry_up"],
                   10, what="registry_up 1 again")
    wait_until(lambda: sees_client(fleet.b, {"g1": 2}) and node_row(fleet.a, "b") is not None, 10,
               what="the fleet view resynced")
    assert http("GET", f"{fleet.b.url}/hello").status == 200


def test_single_host_admin_cluster_shows_this_node(stack):
    view = get_json(f"{stack.admin_url}/admin/cluster")
    assert view["registry_up"] is None and len(view["nodes"]) == 1
    (node,) = view["nodes"]
    assert node["node_id"] == view["node_id"] and node["groups"] == {"g1": 2} and node["state"] == "serving"
    assert node["address"] == f"127.0.0.1:{stack.tunnel_port}" and node["peer"] is None
    assert "tunnel_cluster_registry_up" not in http("GET", f"{stack.admin_url}/metrics").body.decode()


def test_a_taken_peer_port_stops_the_start(tmp_path):
    """peer_port is claimed with the others at start (gateway/ports.py): exit 3, naming it."""
    with socket.socket() as blocker:
        blocker.bind((A, 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        path = tmp_path / "node.toml"
        path.write_text(to_toml({"gateway": {
            "host": A, "admin_host": A, "http_port": free_port(), "tunnel_port": free_port(), "grpc_port": 0,
            "admin_port": free_port(), "cluster": "redis://127.0.0.1:9/0", "node_id": "x", "peer_port": port}}))
        out = subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(path)], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert out.returncode == 3 and f"port {port} (peer_port" in out.stderr, out.stderr[-2000:]


def test_routers_answer_full_and_lost_across_nodes(redis_server, tmp_path):
    """Router level, in this process: two real brokers with their peer links (and Redis for the
    registry), and a worker socket on each. A batch for a worker of the other node that is not
    there comes back LOST; once that node's worker stops reading and its queue (high-water
    mark 1) is full, batches come back FULL, naming it: 503 for those requests only."""
    peer_port = free_port()
    brokers, threads, socks = [], [], []
    ctx = zmq.Context()
    try:
        for host, node_id in ((A, "ra"), (B, "rb")):
            settings = ClusterSettings(redis_server.url, "routers-test", node_id, TTL, f"tcp://{host}:{peer_port}",
                                       f"{host}:1", f"tcp://{host}:{peer_port}")
            broker = Broker(f"ipc://{tmp_path}/{node_id}", hwm=1, cluster=Cluster(settings))
            broker.bind()
            brokers.append(broker)
            threads.append(threading.Thread(target=broker.run, daemon=True))
            threads[-1].start()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, b"w0")
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 1)
            sock.connect(f"ipc://{tmp_path}/{node_id}")
            socks.append(sock)
        a, b = socks
        wait_until(lambda: all(br.cluster.peers.peers.get(n) and br.cluster.peers.peers[n].live
                               for br, n in zip(brokers, ("rb", "ra"))), 10, what="the routers hear each other")
        a.send_multipart(env.to_router(env.FRAMES, b"rb/w7", b"x"))
        assert a.recv_multipart() == [env.ROUTER_ID, env.LOST, b"rb/w7"]
        b.send_multipart(env.to_router(env.ANNOUNCE, b"", b'{"pid": 1}'))  # b's w0 is known to its router
        replies: list[list[bytes]] = []
        payload = b"z" * (256 << 10)
        deadline = time.monotonic() + 20
        while not replies and time.monotonic() < deadline:
            a.send_multipart(env.to_router(env.FRAMES, b"rb/w0", payload))
            while a.poll(10):
                replies.append(a.recv_multipart())
        fulls = [m for m in replies if m[1] == env.FULL]
        assert fulls and fulls[0] == [b"rb/w0", env.FULL, payload], [m[:2] for m in replies]
        assert brokers[1].overloaded >= 1 and brokers[0].overloaded == 0  # refused at node b, not on the link
        first = b.recv_multipart()
        while first[1] != env.FRAMES:  # past its router's table broadcasts
            first = b.recv_multipart()
        assert first[:2] == [b"ra/w0", env.FRAMES]  # b's worker sees who sent it: a channel keyed ra/w0
    finally:
        for broker in brokers:
            broker.stop()
        for thread in threads:
            thread.join(5)
        for sock in socks:
            sock.close(0)
        for broker in brokers:
            broker.destroy()
        ctx.term()


def test_node_a_killed(fleet):
    """Last: it takes node A down. A request in flight through A fails with 502 within
    a few seconds; new requests for the group get 503 (the client cannot reach b yet);
    A leaves b's view when its lease expires."""
    url = f"{fleet.b.url}/slow?ms=20000"
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        in_flight = pool.submit(http, "GET", url, timeout=30)
        wait_until(lambda: get_json(f"{fleet.a.backend_url}/stats")["inflight"] >= 1, 10, what="request in flight")
        killed = time.monotonic()
        os.killpg(fleet.a.gateway.popen.pid, signal.SIGKILL)
        r = in_flight.result(timeout=10)
        failed_after = time.monotonic() - killed
        assert r.status == 502 and r.json()["error"] == "tunnel_closed", r.body[:300]
        assert failed_after < 5, f"the request in flight took {failed_after:.2f}s to fail"
    finally:
        pool.shutdown(wait=False)

    def refused() -> bool:
        r = http("GET", f"{fleet.b.url}/hello", timeout=5)
        assert r.status in (200, 502, 503), r.body[:300]
        return r.status == 503 and r.json()["error"] == "no_client_available"

    wait_until(refused, TTL * 1.5 + 2, what="503 no_client_available on b")
    refused_after = time.monotonic() - killed
    wait_until(lambda: node_row(fleet.b, "a") is None, max(0.5, TTL * 1.5 + 2 - (time.monotonic() - killed)),
               what="node a gone from b's /admin/cluster")
    gone_after = time.monotonic() - killed
    assert refused_after < TTL * 1.5 + 1
    print(f"\nnode a killed: in-flight 502 after {failed_after:.2f}s, new requests 503 after {refused_after:.2f}s, "
          f"gone from b's view after {gone_after:.2f}s")
