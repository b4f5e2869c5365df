"""Staged rollouts across a fleet: nodes a (127.0.0.2, the oldest: it decides) and b
(127.0.0.3), then c (127.0.0.4), a real redis-server, one client on each node. The
canary is chosen over the whole fleet's clients, judged by requests entering any
node, rolled back for the whole fleet; the book lives in the registry, so a node
that joins later gives its clients the last promoted version, not its file's. With
the deciding node gone, the next oldest decides. Every process is stopped after the
test, passed or failed."""
from __future__ import annotations

import orjson
import redis

from tests.harness import free_port, get_json, http, to_toml, wait_until
from tests.test_fleet import node_settings
from tests.test_rollouts import _group, _post

C = "127.0.0.4"
ROLLOUT = {"canary": 1, "bake": 60, "min_requests": 5}


def _rollout(stack) -> dict:
    return get_json(f"{stack.admin_url}/admin/rollouts")["groups"]["g1"]


def _versions(*stacks) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for stack in stacks:
        for c in get_json(f"{stack.admin_url}/admin/clients")["clients"]:
            out.setdefault(c["client_id"], set()).add(c["config_version"])
    return out


def _tag(stack) -> str:
    r = http("GET", f"{stack.url}/echo", headers={"Connection": "close"})
    return dict((k.lower(), v) for k, v in r.json()["headers"]).get("x-rules", "") if r.status == 200 else str(r.status)


def _reload(stack, tag: str, servers: list[str], rollout: dict = ROLLOUT) -> None:
    doc = stack.doc
    doc["groups"]["g1"] = _group(tag, servers, rollout)
    stack.gateway_config.write_text(to_toml(doc))
    assert _post(stack, "/admin/reload").status == 200


def _node(make_stack, redis_url: str, host: str, name: str, node_id: str, peer_port: int, like=None,
          tag: str = "v1", servers: list[str] | None = None):
    def edit(stack, doc):
        doc["groups"] = {"g1": _group(tag, servers or [stack.backend_url], ROLLOUT)}
        stack.doc = doc
    settings = {**node_settings(redis_url, node_id, peer_port), "watch_config": False}
    stack = make_stack(host=host, name=name, like=like, settings=settings, edit=edit, client=None)
    return stack


def test_a_fleet_rolls_back_together_and_a_later_node_keeps_the_verdict(redis_server, make_stack):
    peer_port = free_port()
    a = _node(make_stack, redis_server.url, "127.0.0.2", "gateway-a", "a", peer_port)
    b = _node(make_stack, redis_server.url, "127.0.0.3", "gateway-b", "b", peer_port, like=a)
    a.start_client("ca", extra=["--connections", "1", "--no-learn-fleet"])
    b.start_client("cb", extra=["--connections", "1", "--no-learn-fleet"])
    # The decider (a) sees both nodes' clients once the peer link and the registry are up.
    wait_until(lambda: _rollout(b)["clients"] == ["ca", "cb"] and _rollout(b)["state"] == "none", 20,
               what="a sees both clients, b asking a for rollouts", watch=(a.gateway, b.gateway))

    dead = f"http://127.0.0.1:{free_port()}"
    _reload(b, "v2", [dead])  # b does not decide: nothing starts
    assert _rollout(a)["state"] == "none" and "does not decide rollouts" in b.gateway.output()
    _reload(a, "v2", [dead])
    r = wait_until(lambda: (x := _rollout(b))["state"] == "baking" and x["canary"] and x, 15, what="baking")
    assert r["canary"][0] in ("ca", "cb") and set(r["clients"]) == {"ca", "cb"}  # chosen over the fleet
    assert get_json(f"{b.admin_url}/admin/rollouts")["decided_by"] == "a/w0"
    wait_until(lambda: _versions(a, b)[r["canary"][0]] == {r["new"]}, 15, what="the canary on v2")
    assert all(v == {r["old"]} for c, v in _versions(a, b).items() if c != r["canary"][0])

    def rolled_back():
        for stack in (a, b):  # requests entering either node count
            for _ in range(3):
                _tag(stack)
        x = _rollout(b)
        return x["state"] == "rolled_back" and x
    done = wait_until(rolled_back, 40, interval=0.1, what="rolled back", watch=(a.gateway, b.gateway))
    assert done["rejected"] == r["new"] and "error rate" in done["reason"]
    assert all(v == {r["old"]} for v in _versions(a, b).values())
    assert {_tag(a) for _ in range(6)} | {_tag(b) for _ in range(6)} == {"v1"}
    # The verdict lives in the registry.
    stored = orjson.loads(redis.Redis.from_url(redis_server.url).get("fleet-test:rollouts"))
    assert stored["rejected"] == {"g1": r["new"]} and stored["rollouts"]["g1"]["state"] == "rolled_back"

    # A node that joins later, its file at the rejected version and no state of its own:
    # its client gets the version the fleet runs.
    c = _node(make_stack, redis_server.url, C, "gateway-c", "c", peer_port, like=a, tag="v2", servers=[dead])
    c.start_client("cc", extra=["--connections", "1", "--no-learn-fleet"])
    assert _versions(c)["cc"] == {r["old"]}
    assert "config applied" in c.clients["cc"][0].output() and r["new"] not in c.clients["cc"][0].output()

    # The deciding node gone, the next oldest (b) decides: a new version, promoted by hand through c.
    a.gateway.stop()
    _reload(b, "v3", [b.backend_url])
    r3 = wait_until(lambda: (x := _rollout(c))["state"] == "baking" and x["new"] not in (r["old"], r["new"]) and x,
                    20, what="b started a rollout", watch=(b.gateway, c.gateway))
    assert get_json(f"{c.admin_url}/admin/rollouts")["decided_by"] == "b/w0"
    assert _post(c, "/admin/rollouts/g1/promote").status == 200
    wait_until(lambda: all(v == {r3["new"]} for v in _versions(b, c).values()), 15, what="all on v3")
    assert {_tag(b) for _ in range(4)} | {_tag(c) for _ in range(4)} == {"v3"}
