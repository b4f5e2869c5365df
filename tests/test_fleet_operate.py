"""Operating the fleet (issue 18, part 7): the status page's Fleet section, a drain of one
node's streams sent to another node's admin, and scripts/rebalance.py --fleet.

Node A listens on 127.0.0.3 and B on 127.0.0.2 (so B sorts first). Clients of one
connection each, given A only, connect while A is alone; B joins after. A client spreads
its own connections (a node more than one apart), so one connection each never moves by
itself: the fleet holds every stream on A. A drained connection reconnects to the
least-loaded node its placement picks, the node that drained it last on a tie: that is what
lets a drain move it. Real processes, a real redis-server; every
wait polls with a deadline; every process is stopped after the module, passed or failed."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest

from gateway.workers.admin import drain_targets, drain_workers
from gateway.workers.status_page import render_status_page
from tests.harness import ROOT, Stack, free_port, get_json, http, wait_until
from tests.test_fleet import node_row, node_settings
from tests.test_status_page import CHROMIUM

A, B = "127.0.0.3", "127.0.0.2"
PREFIX = "operate-test"


def streams(view_from: Stack, node_id: str) -> int | None:
    """g1 streams of `node_id` as `view_from`'s /admin/cluster shows them (None: not serving)."""
    row = node_row(view_from, node_id)
    return row["groups"].get("g1", 0) if row is not None and row["state"] == "serving" else None


def drain(via: Stack, body: bytes):
    return http("POST", f"{via.admin_url}/admin/drain", body, {"Content-Type": "application/json"})


def settings(redis_url: str, node_id: str, peer_port: int) -> dict:
    return {**node_settings(redis_url, node_id, peer_port), "cluster_prefix": PREFIX}


class Fleet:
    def __init__(self, a: Stack, b: Stack) -> None:
        self.a, self.b = a, b
        self.clients: list[str] = []

    def start_clients(self, ids: list[str]) -> None:
        for cid in ids:
            self.a.start_client(cid, wait=False, extra=["--connections", "1"])  # --server: node A's only
        self.clients += ids
        wait_until(lambda: all(self.a.client_status(c)["connections"] == 1 for c in ids), 20,
                   what="clients connected", watch=(self.a.gateway, self.b.gateway))

    def clients_know(self, nodes: list[str]) -> bool:
        """Every client knows these nodes (a drained one reconnects by what it knows)."""
        return all(set(nodes) <= set(self.a.client_status(c)["nodes"]) for c in self.clients)


@pytest.fixture(scope="module")
def fleet(redis_server, make_module_stack) -> Fleet:
    peer_port = free_port()
    a = make_module_stack(host=A, name="gateway-a", settings=settings(redis_server.url, "a", peer_port), client=None)
    ops = Fleet(a, a)
    ops.start_clients(["c1", "c2", "c3", "c4"])
    ops.b = make_module_stack(host=B, name="gateway-b", like=a, settings=settings(redis_server.url, "b", peer_port),
                              client=None)
    wait_until(lambda: streams(ops.b, "a") == 4 and streams(ops.b, "b") == 0 and streams(a, "b") == 0, 20,
               what="both nodes see the fleet, every stream on a", watch=(a.gateway, ops.b.gateway))
    # The clients learn b from their node's FLEET push (at most one a second).
    wait_until(lambda: ops.clients_know([f"{A}:{a.tunnel_port}", f"{B}:{a.tunnel_port}"]), 15,
               what="the clients know node b", watch=(a.gateway, ops.b.gateway))
    return ops


def test_status_page_of_b_shows_both_nodes(fleet):
    page = http("GET", f"{fleet.b.admin_url}/").body.decode()
    section = page.split('id="fleet"', 1)[1].split("</table>", 1)[0]
    rows = {r.split("</td>", 1)[0].rpartition(">")[2]: r for r in section.split("<tr>")[2:]}
    assert set(rows) == {"a", "b"}, section
    assert "g1: 4" in rows["a"] and "serving" in rows["a"] and f"{A}:{fleet.a.tunnel_port}" in rows["a"]
    assert "none" in rows["b"] and "this node" in rows["b"] and "this node" not in rows["a"]
    assert "registry <span class=\"ok\">up</span>" in section
    # One host, no `cluster`: no Fleet section at all.
    alone = render_status_page([], {}, None, None)
    assert "Fleet" not in alone and 'id="fleet"' not in alone


def test_drain_sent_to_b_moves_streams_off_a(fleet):
    assert streams(fleet.b, "a") == 4
    r = drain(fleet.b, b'{"node": "a", "group": "g1", "limit": 2}')
    answer = r.json()
    assert r.status == 200 and answer["node"] == "a" and answer["drained"] == 2, answer
    assert set(answer["workers"]) <= {"a/w0", "a/w1"} and answer["unanswered"] == [], answer
    # Their clients reconnected to b; both nodes' views agree.
    wait_until(lambda: streams(fleet.b, "a") == 2 and streams(fleet.b, "b") == 2
               and streams(fleet.a, "a") == 2 and streams(fleet.a, "b") == 2, 20,
               what="two streams moved from a to b", watch=(fleet.a.gateway, fleet.b.gateway))
    # A node the fleet does not know: 404; a group with nothing to take: 0.
    unknown = drain(fleet.b, b'{"node": "zz", "limit": 1}')
    assert unknown.status == 404 and unknown.json()["error"] == "unknown_node"
    assert drain(fleet.b, b'{"node": "a", "group": "nope"}').json()["drained"] == 0
    # The node itself by name: its own workers (one answers here, the other through the router).
    own = drain(fleet.a, b'{"node": "a", "limit": 0}').json()
    assert own["node"] == "a" and own["drained"] == 0
    assert drain(fleet.a, b'{"node": "a", "group": "nope"}').json()["unanswered"] == []


def test_rebalance_fleet_spreads_streams_over_the_nodes(fleet):
    # Four more clients while b is up: given a only, one connection each, they stay on a.
    fleet.start_clients(["c5", "c6", "c7", "c8"])
    wait_until(lambda: streams(fleet.b, "a") == 6 and streams(fleet.b, "b") == 2
               and fleet.clients_know([f"{A}:{fleet.a.tunnel_port}", f"{B}:{fleet.b.tunnel_port}"]), 20,
               what="6 on a, 2 on b, every client knowing both")
    script = [sys.executable, "scripts/rebalance.py", "--admin", fleet.b.admin_url, "--fleet"]
    dry = subprocess.run([*script, "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert dry.returncode == 0 and "would drain one stream of group g1 from node a" in dry.stdout, dry
    assert streams(fleet.b, "a") == 6  # the dry run changed nothing
    run = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.stdout, run.stderr)
    assert "draining one stream of group g1 from node a" in run.stdout and "balanced after" in run.stdout
    wait_until(lambda: sum(streams(fleet.a, n) or 0 for n in "ab") == 8, 10, what="every stream back")
    a, b = streams(fleet.a, "a"), streams(fleet.a, "b")
    assert abs(a - b) <= 2 and a + b == 8, (a, b)  # within the tolerance (1) of the mean (4)
    again = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "balanced after 0 drains" in again.stdout
    assert get_json(f"{fleet.a.admin_url}/admin/cluster")["registry_up"] is True


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); CI installs it")
def test_status_page_fleet_section_in_headless_chromium(fleet):
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom", f"{fleet.b.admin_url}/"],
            capture_output=True, text=True, timeout=60,
        )
    # After the page's own refresh (2 s of virtual time) the section is still there, both nodes in it.
    section = out.stdout.split('id="fleet"', 1)[1].split("</table>", 1)[0]
    assert ">a</td>" in section and ">b</td>" in section and "this node" in section, out.stderr[-2000:]


# -- the drain's choices, with stand-ins for the worker and its link (no processes) -------------

class _Link:
    def __init__(self, answers: dict[str, int | None], remote: dict[str, dict]) -> None:
        self.answers, self.remote, self.asked = answers, remote, []

    async def ask(self, name: str, command: dict) -> int | None:
        self.asked.append((name, dict(command)))
        answer = self.answers[name]
        return None if answer is None else min(answer, command.get("limit", answer))


def _worker(link: _Link, nodes: list[dict]) -> SimpleNamespace:
    view = {"node_id": "b", "registry_up": True, "nodes": nodes}
    link.fleet = view
    return SimpleNamespace(config=SimpleNamespace(cluster="redis://x", node_id="b"), link=link, index=0,
                           routing=SimpleNamespace(run_command=lambda _c: 0))


def _row(worker: int, n: int) -> dict:
    return {"worker": worker, "clients": [{"client_id": f"c{i}", "group": "g1", "connection": f"c{i}/0",
                                           "draining": False} for i in range(n)]}


def test_drain_targets_unknown_and_unreachable_nodes():
    rows = {"a/w0": _row(0, 1), "c/w0": _row(0, 1)}
    w = _worker(_Link({}, rows), [{"node_id": "b", "state": "serving"}, {"node_id": "a", "state": "serving"},
                                  {"node_id": "c", "state": "unreachable"}])
    assert drain_targets(w, {"node": "zz"}).status == 404
    assert drain_targets(w, {"node": "c"}).status == 503
    assert drain_targets(w, {"node": "a"}) == ("a", {"a/w0": rows["a/w0"]})
    assert drain_targets(w, {"node": "a", "worker": 1}) == ("a", {})


def test_drain_limit_counts_the_nodes_streams_together_most_loaded_first():
    rows = {"a/w0": _row(0, 1), "a/w1": _row(1, 3)}
    link = _Link({"a/w0": 1, "a/w1": 3}, rows)
    w = _worker(link, [])
    answer = asyncio.run(drain_workers(w, rows, {"op": "drain", "limit": 2}))
    assert answer["drained"] == 2 and answer["workers"] == {"a/w1": 2} and link.asked[0][0] == "a/w1"
    answer = asyncio.run(drain_workers(w, rows, {"op": "drain", "limit": 4}))
    assert answer["drained"] == 4 and answer["workers"] == {"a/w1": 3, "a/w0": 1}
    link.answers["a/w0"] = None  # gone, or a worker that does not answer
    answer = asyncio.run(drain_workers(w, rows, {"op": "drain"}))
    assert answer["drained"] == 3 and answer["unanswered"] == ["a/w0"]
