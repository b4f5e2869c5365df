"""Unit tests of the fleet's parts that need no Redis and no gateway: the cluster
settings and their checks, the node record's workers (strict JSON), choosing among
nodes (balance.py, Routing.candidates), and the routers' peer links (real ZeroMQ
sockets on loopback: heartbeats, liveness, a node not in the registry, a node that
speaks for another's workers)."""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
import zmq

from gateway.balance import Balancer, Candidate
from gateway.cluster.config import cluster_settings
from gateway.cluster.record import ClientLoad, NodeRecord, WorkerLoad, routing_changed
from gateway.config import ENV_PREFIX, load_gateway_config
from gateway.ports import port_clash
from gateway.router import envelope as env
from gateway.router.cluster import Cluster
from gateway.router.peers import PEER_HEARTBEAT_INTERVAL, PEER_LIVENESS, PeerLinks
from gateway.settings import ConfigError
from gateway.workers.routing import Routing
from tests.harness import free_port, wait_until

REDIS = "redis://:pw@127.0.0.1:6379/0"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def load(tmp_path: Path, gateway: str) -> object:
    path = tmp_path / "gateway.toml"
    path.write_text(f"[gateway]\n{gateway}\n")
    return load_gateway_config(str(path))


# -- settings ------------------------------------------------------------------------------


def test_without_cluster_nothing_changes(tmp_path):
    cfg = load(tmp_path, "")
    assert (cfg.cluster, cfg.node_id, cfg.advertise_host, cfg.peer_port) == ("", "", "", 7100)
    assert cluster_settings(cfg.settings) is None
    # peer_port is no port of a single host: it clashes with nothing.
    assert port_clash({"host": "0.0.0.0", "http_port": 7100, "peer_port": 7100}) is None


def test_cluster_fills_in_node_id_and_advertise_host(tmp_path):
    cfg = load(tmp_path, f'cluster = "{REDIS}"\nhost = "10.0.0.2"\ntunnel_port = 50001')
    assert cfg.node_id == socket.gethostname() and cfg.advertise_host == "10.0.0.2"
    s = cluster_settings(cfg.settings)
    assert (s.peer, s.tunnel, s.bind, s.prefix, s.node_ttl) == (
        "tcp://10.0.0.2:7100", "10.0.0.2:50001", "tcp://10.0.0.2:7100", "tunnel", 5.0)
    cfg = load(tmp_path, f'cluster = "{REDIS}"\nhost = "::"\nadvertise_host = "fd00::2"\nnode_id = "n-1.a_b"')
    s = cluster_settings(cfg.settings)
    assert (s.node_id, s.peer, s.bind) == ("n-1.a_b", "tcp://[fd00::2]:7100", "tcp://*:7100")


@pytest.mark.parametrize("gateway,key", [
    ('cluster = "http://127.0.0.1:6379"', "gateway.cluster"),
    ('cluster = "redis://"', "gateway.cluster"),
    (f'cluster = "{REDIS}"', "gateway.advertise_host"),  # host 0.0.0.0: whom would others dial?
    (f'cluster = "{REDIS}"\nhost = "10.0.0.2"\nadvertise_host = "0.0.0.0"', "gateway.advertise_host"),
    ('advertise_host = "tcp://10.0.0.2"', "gateway.advertise_host"),
    ('node_id = "a/b"', "gateway.node_id"),
    ('node_id = "a b"', "gateway.node_id"),
    ('cluster_prefix = ""', "gateway.cluster_prefix"),
    ("node_ttl = 0", "gateway.node_ttl"),
    (f'cluster = "{REDIS}"\nhost = "10.0.0.2"\npeer_port = 0', "gateway.peer_port"),
    (f'cluster = "{REDIS}"\nhost = "10.0.0.2"\npeer_port = 8001', "gateway.peer_port"),  # http_port's
])
def test_bad_cluster_settings_name_file_and_key(tmp_path, gateway, key):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, gateway)
    assert err.value.key == key and err.value.file.endswith("gateway.toml"), err.value


def test_cluster_settings_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNNEL_GATEWAY_CLUSTER", REDIS)
    monkeypatch.setenv("TUNNEL_GATEWAY_NODE_ID", "n7")
    monkeypatch.setenv("TUNNEL_GATEWAY_ADVERTISE_HOST", "10.0.0.7")
    monkeypatch.setenv("TUNNEL_GATEWAY_NODE_TTL", "2.5")
    cfg = load(tmp_path, "")
    assert (cfg.cluster, cfg.node_id, cfg.advertise_host, cfg.node_ttl) == (REDIS, "n7", "10.0.0.7", 2.5)


# -- the record ----------------------------------------------------------------------------


def record(**kw) -> NodeRecord:
    load_ = WorkerLoad((ClientLoad("c1", "g1", "c1/0", 3, False, ("web",), 1700000000.25, ("edge-1.agents",),
                                   "5f0c"),), ("header_fields",))
    return NodeRecord("a", "tcp://10.0.0.2:7100", "10.0.0.2:50001", started=1.5, groups={"g1": 1},
                      workers={"w0": load_}, **kw)


def test_record_workers_round_trip_and_in_flight_is_no_routing_change():
    rec = record()
    assert NodeRecord.from_json(rec.to_json()) == rec
    busier = dataclasses.replace(rec, workers={"w0": dataclasses.replace(
        rec.workers["w0"], clients=(dataclasses.replace(rec.workers["w0"].clients[0], inflight=9),))})
    assert not routing_changed(rec, busier) and busier != rec
    draining = dataclasses.replace(rec, workers={"w0": dataclasses.replace(
        rec.workers["w0"], clients=(dataclasses.replace(rec.workers["w0"].clients[0], draining=True),))})
    assert routing_changed(rec, draining) and routing_changed(rec, dataclasses.replace(rec, workers={}))
    old = orjson.loads(rec.to_json())
    older = orjson.loads(rec.to_json())
    for key in ("connected_at", "certificate", "instance"):  # a node older than duplicate detection
        del older["workers"]["w0"]["clients"][0][key]
    assert NodeRecord.from_json(orjson.dumps(older)).workers["w0"].clients[0].instance == ""
    del old["workers"]  # a record of a node that publishes none: no workers to route to
    assert NodeRecord.from_json(orjson.dumps(old)).workers == {}


@pytest.mark.parametrize("path,value", [
    (("workers",), []),
    (("workers", "x0"), None),  # the key is replaced below: not wN
    (("workers", "w0", "clients"), {}),
    (("workers", "w0", "clients", 0, "inflight"), True),
    (("workers", "w0", "clients", 0, "inflight"), -1),
    (("workers", "w0", "clients", 0, "inflight"), "3"),
    (("workers", "w0", "clients", 0, "connected_at"), "now"),
    (("workers", "w0", "clients", 0, "certificate"), "edge-1"),
    (("workers", "w0", "clients", 0, "instance"), 7),
    (("workers", "w0", "clients", 0, "draining"), 0),
    (("workers", "w0", "clients", 0, "client_id"), 7),
    (("workers", "w0", "clients", 0, "unhealthy"), "web"),
    (("workers", "w0", "capabilities"), [1]),
])
def test_record_refuses_a_bad_worker_part(path, value):
    d = orjson.loads(record().to_json())
    if path[-1] == "x0":
        d["workers"]["x0"] = d["workers"].pop("w0")
    else:
        target = d
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
    with pytest.raises(ValueError):
        NodeRecord.from_json(orjson.dumps(d))


# -- choosing among nodes ------------------------------------------------------------------


def cand(client: str, tier: int, inflight: int = 0, node: str = "") -> Candidate:
    if tier == 2:
        node = node or "b"
    return Candidate(client, 0 if tier == 0 else 1, inflight, stream=object() if tier == 0 else None, node=node)


def test_local_then_this_node_then_other_nodes():
    b = Balancer()
    all_three = [cand("n1", 2), cand("w1", 1), cand("l1", 0)]
    assert {b.pick("g", "round_robin", all_three).client_id for _ in range(6)} == {"l1"}
    assert {b.pick("g", "round_robin", all_three[:2]).client_id for _ in range(6)} == {"w1"}
    nodes = [cand("n1", 2, node="b"), cand("n2", 2, node="c"), cand("n3", 2, 5, node="c")]
    assert {b.pick("g", "round_robin", nodes).client_id for _ in range(6)} == {"n1", "n2", "n3"}
    assert b.pick("g", "least_inflight", nodes[1:]).client_id == "n2"
    # force_cross_worker: through the router first (this node's other workers, then other nodes).
    assert {b.pick("g", "round_robin", all_three, prefer_remote=True).client_id for _ in range(4)} == {"w1"}
    assert b.pick("g", "round_robin", [all_three[0], all_three[2]], prefer_remote=True).client_id == "n1"


def routing_with(tmp_path: Path, remote: dict, table: dict | None = None) -> Routing:
    routing = Routing(load(tmp_path, ""), worker=0, workers=2, spawn=lambda coro: coro.close())
    routing.attach(type("Link", (), {"router_ok": True, "table": table or {}, "remote": remote,
                                     "channels": {}})())
    return routing


def row(node: str, state: str, *clients: tuple[str, str]) -> dict:
    return {"node": node, "worker": 1, "node_state": state, "capabilities": [],
            "clients": [{"client_id": c, "group": g, "connection": f"{c}/0", "inflight": 0, "draining": False,
                         "unhealthy": []} for c, g in clients]}


def test_a_draining_nodes_streams_only_while_no_serving_node_has_one(tmp_path):
    remote = {"b/w1": row("b", "serving", ("c1", "g1")), "c/w1": row("c", "draining", ("c2", "g1"), ("c3", "g2"))}
    routing = routing_with(tmp_path, remote)
    assert [(c.client_id, c.node, c.worker) for c in routing.candidates("g1")] == [("c1", "b", 1)]
    assert [c.client_id for c in routing.candidates("g2")] == ["c3"]  # make-before-break: no other node has g2
    assert routing.candidates("g1", local_only=True) == []
    mine = {"w1": {"worker": 1, "clients": [{"client_id": "c9", "group": "g2", "connection": "c9/0", "pending": 0,
                                              "serving": 0, "draining": False}]}}
    routing = routing_with(tmp_path, remote, mine)  # a stream on this (serving) node: the draining one is left
    assert [(c.client_id, c.node) for c in routing.candidates("g2")] == [("c9", "")]


# -- peer links (real sockets) ----------------------------------------------------------------


def node(node_id: str, port: int, started: float = 1.0) -> NodeRecord:
    return NodeRecord(node_id, f"tcp://127.0.0.1:{port}", "127.0.0.1:1", started=started)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def links(ctx, rec: NodeRecord) -> PeerLinks:
    p = PeerLinks(rec, bind=rec.peer)
    p.bind(ctx)
    return p


def pump(*sides: PeerLinks, now: float | None = None) -> list:
    got = []
    for side in sides:
        side._next_beat = 0.0
        side.heartbeat(now if now is not None else time.monotonic())
    time.sleep(0.02)
    for side in sides:
        got += side.receive()
    return got


def test_heartbeats_make_a_node_live_and_silence_loses_it(ctx):
    a_rec, b_rec = node("a", free_port()), node("b", free_port())
    a, b = links(ctx, a_rec), links(ctx, b_rec)
    try:
        fleet = {"a": a_rec, "b": b_rec}
        assert a.sync(fleet) == [] and b.sync(fleet) == []
        wait_until(lambda: pump(a, b) == [] and a.peers["b"].live and b.peers["a"].live, 5, what="both live")
        assert a.revived and a.peers["b"].heard_at is not None
        # Silent past the liveness: lost (and its queue dropped with a fresh DEALER).
        later = time.monotonic() + PEER_HEARTBEAT_INTERVAL * PEER_LIVENESS + 0.1
        assert [p.node_id for p in a.expire(later)] == ["b"] and not a.peers["b"].live
        wait_until(lambda: pump(a, b) == [] and a.peers["b"].live, 5, what="b heard again: live again")
        # Restarted (another start time in the registry): lost; the old incarnation's heartbeats
        # do not revive it, the new one's do.
        reborn = dataclasses.replace(b_rec, started=2.0)
        lost = a.sync({"a": a_rec, "b": reborn})
        assert [(p.node_id, why) for p, why in lost] == [("b", "restarted")]
        for _ in range(10):
            assert pump(a, b) == [] and not a.peers["b"].live
        b.close()
        # The same port again: ZeroMQ lets the old one go in its own thread (EADDRINUSE for a moment).
        b = wait_until(lambda: links(ctx, reborn), 5, what="b's port free again", ignore=(zmq.ZMQError,))
        b.sync({"a": a_rec, "b": reborn})
        wait_until(lambda: pump(a, b) == [] and a.peers["b"].live, 5, what="the new incarnation live")
        assert [(p.node_id, why) for p, why in a.sync({"a": a_rec})] == [("b", "left")] and a.peers == {}
    finally:
        a.close()
        b.close()


def test_a_node_not_in_the_registry_is_dropped_and_one_may_speak_only_for_itself(ctx, caplog):
    a_rec, b_rec = node("a", free_port()), node("b", free_port())
    a, b = links(ctx, a_rec), links(ctx, b_rec)
    try:
        b.sync({"a": a_rec, "b": b_rec})  # b knows a; a does not know b
        b.peers["a"].dealer.send_multipart(env.to_peer(b"w0", b"b/w0", env.FRAMES, b"x"))
        wait_until(lambda: pump(a) == [] and "not in the registry" in caplog.text, 5, what="dropped with a log")
        assert a.receive() == []

        cluster = Cluster.__new__(Cluster)  # only its delivery: no registry, no sockets of its own
        sent: list[list[bytes]] = []
        cluster.own_id, cluster._workers = b"a", lambda: [b"w0", b"w1"]
        cluster._send_local = lambda msg: sent.append(msg) or True
        cluster._dropped_logged, cluster.peers, cluster._refused = 0.0, a, lambda _dest: None
        a.sync({"a": a_rec, "b": b_rec})
        peer = a.peers["b"]  # in the registry, not heard yet
        cluster._deliver(peer, b"w0", b"c/w3", env.FRAMES, b"x")  # b speaks for c's worker: dropped
        cluster._deliver(peer, b"w0", b"b/w1", env.FRAMES, b"x")
        # b sent before a heard it: a's answers to b's w1 go, nothing else does.
        assert cluster.forward(b"w0", env.FRAMES, b"b/w1", b"y") is True
        assert cluster.forward(b"w0", env.FRAMES, b"b/w2", b"y") is False
        cluster._deliver(peer, b"", b"b/w1", env.LOST, b"")  # b's w1 is gone: every local worker told
        assert sent == [[b"w0", b"b/w1", env.FRAMES, b"x"], [b"w0", env.ROUTER_ID, env.LOST, b"b/w1"],
                        [b"w1", env.ROUTER_ID, env.LOST, b"b/w1"]]
        assert cluster.forward(b"w0", env.FRAMES, b"b/w1", b"y") is False
        assert "not the sender's" in caplog.text
    finally:
        a.close()
        b.close()


def test_a_retry_of_the_same_client_avoids_the_way_that_failed(tmp_path):
    # c1 has a connection on this node's worker 1 and one on node b: a request lost on the
    # way to worker 1 (it stopped) is retried through node b, not worker 1 again.
    routing = routing_with(tmp_path, {"b/w1": row("b", "serving", ("c1", "g1"))},
                           table={"w1": {**row("", "serving", ("c1", "g1")), "clients": [
                               {"client_id": "c1", "group": "g1", "connection": "c1/0", "pending": 0, "serving": 0,
                                "draining": False, "unhealthy": []}]}})
    lost = routing.link.channels[b"w1"] = object()
    via_b = routing.link.channels[b"b/w1"] = object()
    routing.link.channel = lambda peer: routing.link.channels[peer]
    spec = SimpleNamespace(name="g1", balance="round_robin", client=SimpleNamespace(rules=()))
    for _ in range(4):
        stream, client = routing.choose(spec, authority="", path="/", method="GET", headers={}, key=None,
                                        avoid="c1", avoid_stream=lost)
        assert (stream, client) == (via_b, "c1")
    # Without a way that failed, this node's worker is preferred (what the first try took).
    seen = {routing.choose(spec, authority="", path="/", method="GET", headers={}, key=None)[0] for _ in range(4)}
    assert seen == {lost}
