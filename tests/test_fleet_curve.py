"""The fleet's peer links with CURVE keys (issue 18, part 2), real processes and a real
Redis: nodes A (127.0.0.2, client c1 of g1) and B (127.0.0.3) list each other's keys
and forward a request cross-node; node C (127.0.0.4) has a key they do not list: it
registers, but its links are refused (A logs it), requests entering it get 503 at
once, and frames it sends from its key never reach A's workers; node D has no keys
at all: it and the keyed nodes do not link, and both sides say why."""
from __future__ import annotations

import time

import pytest
import zmq

from gateway.cluster.config import curve_keypair
from gateway.router import envelope as env
from tests.harness import Stack, free_port, http, wait_until
from tests.test_fleet import A, B, cluster, metric, node_row, node_settings, sees_client

C = "127.0.0.4"
KEYS = {name: curve_keypair() for name in "abc"}  # node -> (public, secret)
FLEET = [KEYS["a"][0], KEYS["b"][0]]  # what A and B allow: not C


def keyed(redis_url: str, name: str, peer_port: int, allowed: list[str], workers: int = 2) -> dict:
    return {**node_settings(redis_url, name, peer_port), "workers": workers,
            "cluster_secret_key": KEYS[name][1], "cluster_public_keys": allowed}


class Nodes:
    def __init__(self, a: Stack, b: Stack, c: Stack, peer_port: int) -> None:
        self.a, self.b, self.c, self.peer_port = a, b, c, peer_port


@pytest.fixture(scope="module")
def nodes(redis_server, make_module_stack) -> Nodes:
    peer_port = free_port()
    a = make_module_stack(host=A, name="gateway-a", settings=keyed(redis_server.url, "a", peer_port, FLEET),
                          client=None)
    b = make_module_stack(host=B, name="gateway-b", like=a, settings=keyed(redis_server.url, "b", peer_port, FLEET),
                          client=None)
    # C lists everyone: it would link, the others will not.
    c = make_module_stack(host=C, name="gateway-c", like=a, client=None,
                          settings=keyed(redis_server.url, "c", peer_port, [*FLEET, KEYS["c"][0]], workers=1))
    # One connection: the client, told of the fleet's nodes, would spread two over A and B; the
    # group is to be held on A only.
    a.start_client("c1", extra=["--connections", "1"])
    wait_until(lambda: sees_client(b, {"g1": 1}) and node_row(b, "b")["groups"] == {}, 15,
               what="node b sees a's client", watch=(a.gateway, b.gateway))
    return Nodes(a, b, c, peer_port)


def test_keyed_nodes_forward_cross_node(nodes):
    for _ in range(5):
        r = http("GET", f"{nodes.b.url}/hello")
        assert r.status == 200 and len(r.body) == 100, r.body[:300]
    wait_until(lambda: (metric(nodes.a, "tunnel_cross_node_batches_total", 'flow="in"') or 0) > 0, 5,
               what="a counts batches from b")
    assert "plaintext" not in nodes.a.gateway.output()


def test_an_unlisted_node_registers_but_cannot_link(nodes):
    # In the registry, both ways, never reachable.
    wait_until(lambda: node_row(nodes.a, "c") is not None and node_row(nodes.c, "a") is not None, 10,
               what="c registered")
    assert node_row(nodes.a, "c")["state"] == "unreachable" and node_row(nodes.c, "a")["state"] == "unreachable"
    prefix = KEYS["c"][0][:8]
    wait_until(lambda: f"refused a peer link: its CURVE key {prefix}" in nodes.a.gateway.output(), 10,
               what="a logs c's refused handshake")
    def settled() -> tuple[float] | None:  # the figure once b's earlier batches are all counted (a tuple: 0 is one)
        first = metric(nodes.a, "tunnel_cross_node_batches_total", 'flow="in"') or 0
        time.sleep(1.1)
        return (first,) if first == (metric(nodes.a, "tunnel_cross_node_batches_total", 'flow="in"') or 0) else None

    (before,) = wait_until(settled, 10, what="a's batch count settled")
    for _ in range(5):
        started = time.monotonic()
        r = http("GET", f"{nodes.c.url}/hello", timeout=10)
        assert r.status in (502, 503) and time.monotonic() - started < 3, (r.status, r.body[:300])
    # Frames from c's key, sent straight at a's peer port as node "b" would send them: the
    # handshake fails, nothing reaches a's workers.
    ctx = zmq.Context()
    try:
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.setsockopt(zmq.ROUTING_ID, b"b")
        rogue.curve_serverkey = KEYS["a"][0].encode()
        rogue.curve_publickey, rogue.curve_secretkey = KEYS["c"][0].encode(), KEYS["c"][1].encode()
        rogue.connect(f"tcp://{A}:{nodes.peer_port}")
        for _ in range(10):
            try:
                rogue.send_multipart(env.to_peer(b"w0", b"b/w0", env.FRAMES, b"x"), zmq.NOBLOCK)
            except zmq.Again:
                pass  # no handshake done: it cannot even queue
            time.sleep(0.1)
        rogue.close(0)
    finally:
        ctx.term()
    time.sleep(0.5)
    assert (metric(nodes.a, "tunnel_cross_node_batches_total", 'flow="in"') or 0) == before
    assert "not linking with peer node: its CURVE key " + prefix in nodes.a.gateway.output()
    assert http("GET", f"{nodes.b.url}/hello").status == 200  # the fleet's own link is untouched


def test_a_node_without_keys_does_not_link(nodes, redis_server, make_module_stack):
    d = make_module_stack(host=C, name="gateway-d", client=None,
                          settings={**node_settings(redis_server.url, "d", free_port()), "workers": 1})
    wait_until(lambda: node_row(d, "a") is not None and node_row(nodes.a, "d") is not None, 10,
               what="d registered")
    wait_until(lambda: "it uses CURVE keys and this node has none" in d.gateway.output()
               and "its peer links are plaintext" in nodes.a.gateway.output(), 10, what="both sides say why")
    assert "peer links between nodes are plaintext" in d.gateway.output()  # the start warning
    assert node_row(d, "a")["state"] == "unreachable" and node_row(nodes.a, "d")["state"] == "unreachable"
    started = time.monotonic()
    r = http("GET", f"{d.url}/hello", timeout=10)
    assert r.status in (502, 503) and time.monotonic() - started < 3, (r.status, r.body[:300])
    assert cluster(nodes.b)["registry_up"] is True
