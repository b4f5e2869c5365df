"""Staged config rollouts, end to end: a real gateway with two workers, three
real clients of one group, a real backend. Which config a request ran is told
by the header its rule adds (x-rules); which client served it, by the
gateway's count of requests sent down each client's streams."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from typing import Any

import aiohttp
from aiohttp import web

from tests.harness import Stack, free_port, get_json, http, to_toml, wait_until

CLIENTS = ("c1", "c2", "c3")


def _group(tag: str, servers: list[str], rollout: dict | None) -> dict:
    group: dict[str, Any] = {
        "tokens": ["test-token"],
        "upstreams": {"web": {"servers": servers, "max_fails": 0}},
        "rules": [{"path_prefix": "/", "upstream": "web", "add_headers": {"x-rules": tag}}],
    }
    if rollout is not None:
        group["rollout"] = rollout
    return group


def _start(procs, tmp_path, rollout: dict, clients=CLIENTS, client_extra=None) -> tuple[Stack, dict]:
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    doc = stack.gateway_doc(settings={"workers": 2, "watch_config": False},
                            groups={"g1": _group("v1", [stack.backend_url], rollout)})
    stack.start_gateway(doc)
    for cid in clients:
        stack.start_client(cid, extra=client_extra)
    return stack, doc


def _rollout(stack: Stack) -> dict:
    return get_json(f"{stack.admin_url}/admin/rollouts")["groups"]["g1"]


def _post(stack: Stack, path: str, body: dict | None = None):
    return http("POST", f"{stack.admin_url}{path}", body=json.dumps(body).encode() if body is not None else None,
                headers={"Content-Type": "application/json"} if body is not None else None)


def _reload(stack: Stack, doc: dict, tag: str, servers: list[str], rollout: dict) -> float:
    """Write the group's new config and reload it through the admin port; the time it was asked."""
    doc["groups"]["g1"] = _group(tag, servers, rollout)
    stack.gateway_config.write_text(to_toml(doc))
    asked = time.monotonic()
    r = _post(stack, "/admin/reload")
    assert r.status == 200, r.body
    return asked


def _sent(stack: Stack) -> dict[str, int]:
    """Requests each client has served (from its own status port)."""
    return {cid: stack.client_status(cid)["requests_served"] for cid in stack.clients}


def _versions(stack: Stack) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for c in get_json(f"{stack.admin_url}/admin/clients")["clients"]:
        out.setdefault(c["client_id"], set()).add(c["config_version"])
    return out


def _tags(stack: Stack, n: int) -> dict[str, int]:
    """`n` requests through the gateway: how many ran each config (by its x-rules header; "502" etc. when failed)."""
    out: dict[str, int] = {}
    for _ in range(n):
        r = http("GET", f"{stack.url}/echo", headers={"Connection": "close"})
        tag = dict((k.lower(), v) for k, v in r.json()["headers"]).get("x-rules", "") if r.status == 200 \
            else str(r.status)
        out[tag] = out.get(tag, 0) + 1
    return out


def _wait_state(stack: Stack, state: str, timeout: float, traffic: bool = True) -> dict:
    """Wait for the rollout's state, sending requests meanwhile (a canary is judged by its figures)."""
    def reached() -> dict | None:
        if traffic:
            _tags(stack, 4)
        r = _rollout(stack)
        return r if r["state"] == state else None
    return wait_until(reached, timeout, interval=0.1, what=f"rollout {state}", watch=stack.gateway)


def _canary_acked(stack: Stack) -> dict:
    """Wait for a rollout baking whose canary runs the new version (and the rest the old)."""
    def ready() -> dict | None:
        r = _rollout(stack)
        if r["state"] != "baking" or not r["canary"]:
            return None
        versions = _versions(stack)
        if all(versions.get(c) == {r["new"]} for c in r["canary"]) and \
                all(v == {r["old"]} for c, v in versions.items() if c not in r["canary"]):
            return r
        return None
    return wait_until(ready, 15, what="canary on the new version, the rest on the old", watch=stack.gateway)


def test_canary_gets_the_new_rules_the_rest_the_old_then_all_after_the_bake(procs, tmp_path):
    rollout = {"canary": 1, "bake": 3, "min_requests": 10}
    stack, doc = _start(procs, tmp_path, rollout)
    assert _rollout(stack)["state"] == "none"
    assert _tags(stack, 6) == {"v1": 6}

    asked = _reload(stack, doc, "v2", [stack.backend_url], rollout)
    r = _canary_acked(stack)
    assert len(r["canary"]) == 1 and r["old"] != r["new"]
    canary = r["canary"][0]
    before = _sent(stack)
    tags = _tags(stack, 60)
    after = _sent(stack)
    to_canary = after[canary] - before[canary]
    # Where each request went says which config it ran: the canary's are v2, every other v1.
    assert tags.get("v2", 0) == to_canary and tags.get("v1", 0) == 60 - to_canary, (tags, before, after)
    assert 0 < to_canary < 60

    promoted = _wait_state(stack, "promoted", 30)
    took = time.monotonic() - asked
    assert promoted["new"] == r["new"] and "canary error rate 0.0%" in promoted["reason"]
    wait_until(lambda: all(v == {r["new"]} for v in _versions(stack).values()), 10, what="every client on v2")
    assert _tags(stack, 10) == {"v2": 10}
    assert took >= 3.0
    assert _rollout(stack)["history"][0]["state"] == "promoted"
    print(f"reload to promotion: {took:.2f} s (bake 3 s)")


def test_a_dead_upstream_on_the_canary_rolls_back_within_the_bake_and_stays_rejected(procs, tmp_path):
    rollout = {"canary": 1, "bake": 60, "min_requests": 5}
    stack, doc = _start(procs, tmp_path, rollout)
    dead = f"http://127.0.0.1:{stack.backend_port + 1 if stack.backend_port < 65535 else 1}"
    asked = _reload(stack, doc, "v2", [dead], rollout)
    r = _canary_acked(stack)
    rolling = _wait_state(stack, "rolled_back", 30)
    took = time.monotonic() - asked
    assert took < 60 and rolling["new"] == r["new"] and rolling["rejected"] == r["new"]
    assert "canary error rate" in rolling["reason"] and rolling["acknowledged"]
    # The group keeps serving, every client on the old config again.
    assert all(v == {r["old"]} for v in _versions(stack).values())
    assert _tags(stack, 20) == {"v1": 20}
    out = stack.gateway.output()
    assert "rollout rolling back: group g1" in out and '"level":"warning"' in out
    metrics = http("GET", f"{stack.admin_url}/metrics").body.decode()
    assert 'tunnel_rollouts_total{event="rolling_back",group="g1"} 1.0' in metrics
    page = http("GET", f"{stack.admin_url}/").body.decode()
    assert "rolled back" in page and r["new"] in page
    print(f"reload to rolled_back: {took:.2f} s")

    # The rejected version is not tried again: not by a reload of the same file...
    assert _post(stack, "/admin/reload").status == 200
    assert _rollout(stack)["state"] == "rolled_back" and _tags(stack, 6) == {"v1": 6}
    # ...nor after a restart: the clients get the last promoted config, not the file's.
    stack.gateway.stop()
    stack.start_gateway(doc)
    wait_until(lambda: sum(stack.status()["groups"].values()) == 6 and stack.routable(), 30, what="clients back")
    after = _rollout(stack)
    assert after["state"] == "rolled_back" and after["rejected"] == r["new"] and after["stable"] == r["old"]
    assert all(v == {r["old"]} for v in _versions(stack).values())
    assert _tags(stack, 10) == {"v1": 10}
    # A changed file starts a new rollout.
    _reload(stack, doc, "v3", [stack.backend_url], rollout)
    assert _canary_acked(stack)["old"] == r["old"]


def test_a_refusal_by_a_canary_halts_the_rollout_and_rolls_it_back(procs, tmp_path):
    rollout = {"canary": "50%", "bake": 60}
    # These clients may reach only 127.0.0.1: an upstream named localhost is refused.
    stack, doc = _start(procs, tmp_path, rollout, clients=("c1", "c2"),
                        client_extra=["--allow-upstreams", "127.0.0.1:*"])
    _reload(stack, doc, "v2", [f"http://localhost:{stack.backend_port}"], rollout)
    halted = _wait_state(stack, "halted", 20)
    assert "refused" in halted["reason"] and "allow_upstreams" in halted["reason"]
    assert len(halted["canary"]) == 1 and halted["rejected"] == halted["new"]
    wait_until(lambda: _rollout(stack)["acknowledged"], 10, what="halted rollout acknowledged")
    assert all(v == {halted["old"]} for v in _versions(stack).values())
    assert _tags(stack, 10) == {"v1": 10}


def test_promote_and_roll_back_by_hand(procs, tmp_path):
    rollout = {"canary": 1, "bake": 600}
    stack, doc = _start(procs, tmp_path, rollout, clients=("c1", "c2"))
    assert _post(stack, "/admin/rollouts/g1/promote").status == 409  # nothing to promote yet
    assert _post(stack, "/admin/rollouts/nope/rollback").status == 404
    assert _post(stack, "/admin/rollouts/g1/sideways").status == 404
    _reload(stack, doc, "v2", [stack.backend_url], rollout)
    r = _canary_acked(stack)
    assert 500 < r["time_left"] <= 600
    answer = _post(stack, "/admin/rollouts/g1/promote", {"reason": "looks fine"})
    assert answer.status == 200 and answer.json()["state"] == "promoted"
    assert answer.json()["reason"] == "by hand: looks fine"
    wait_until(lambda: all(v == {r["new"]} for v in _versions(stack).values()), 10, what="every client on v2")
    assert _tags(stack, 8) == {"v2": 8}
    # Undo a promotion: every client goes back, and the version is rejected.
    answer = _post(stack, "/admin/rollouts/g1/rollback")
    assert answer.status == 200 and answer.json()["state"] == "rolling_back"
    done = wait_until(lambda: (x := _rollout(stack))["state"] == "rolled_back" and x, 10, what="rolled back")
    assert done["rejected"] == r["new"] and done["history"][0]["state"] == "rolled_back"
    assert all(v == {r["old"]} for v in _versions(stack).values())
    assert _tags(stack, 8) == {"v1": 8}


def test_a_reload_during_a_rollout_replaces_it(procs, tmp_path):
    rollout = {"canary": 1, "bake": 600}
    stack, doc = _start(procs, tmp_path, rollout, clients=("c1", "c2"))
    _reload(stack, doc, "v2", [stack.backend_url], rollout)
    first = _canary_acked(stack)
    _reload(stack, doc, "v3", [stack.backend_url], rollout)
    second = wait_until(lambda: (x := _rollout(stack))["new"] != first["new"] and x, 10, what="a new rollout")
    assert second["old"] == first["old"]  # from the last promoted version, not the canary's
    assert second["history"][0]["state"] == "replaced" and second["history"][0]["new"] == first["new"]
    _canary_acked(stack)
    tags = _tags(stack, 30)
    assert set(tags) == {"v1", "v3"}, tags
    # The file back at the stable version ends the rollout: every client on it.
    _reload(stack, doc, "v1", [stack.backend_url], rollout)
    back = wait_until(lambda: (x := _rollout(stack))["state"] == "rolled_back" and x["acknowledged"] and x, 10,
                      what="rollout ended")
    assert "back at version" in back["reason"] and back["rejected"] is None
    assert _tags(stack, 10) == {"v1": 10}


def test_requests_in_flight_finish_on_the_config_they_started_with(procs, tmp_path):
    rollout = {"canary": 1, "bake": 600}
    stack, doc = _start(procs, tmp_path, rollout, clients=("c1", "c2"))

    async def slow_requests(switch) -> list[int]:
        async with aiohttp.ClientSession() as s:
            async def one() -> int:
                async with s.get(f"{stack.url}/slow?ms=1500") as r:
                    await r.read()
                    return r.status
            tasks = [asyncio.ensure_future(one()) for _ in range(12)]
            await asyncio.sleep(0.4)
            await asyncio.to_thread(switch)
            return list(await asyncio.gather(*tasks))

    def to_canary() -> None:
        _reload(stack, doc, "v2", [f"http://localhost:{stack.backend_port}"], rollout)
        _canary_acked(stack)

    assert asyncio.run(slow_requests(to_canary)) == [200] * 12
    assert asyncio.run(slow_requests(lambda: _post(stack, "/admin/rollouts/g1/promote"))) == [200] * 12
    wait_until(lambda: _rollout(stack)["acknowledged"], 10, what="promotion acknowledged")
    assert asyncio.run(slow_requests(lambda: _post(stack, "/admin/rollouts/g1/rollback"))) == [200] * 12


def test_a_sighup_starts_a_rollout_too_and_the_status_page_shows_it(procs, tmp_path):
    rollout = {"canary": 1, "bake": 600}
    stack, doc = _start(procs, tmp_path, rollout, clients=("c1",))
    doc["groups"]["g1"] = _group("v2", [stack.backend_url], rollout)
    stack.gateway_config.write_text(to_toml(doc))
    stack.gateway.popen.send_signal(signal.SIGHUP)
    r = _canary_acked(stack)
    assert r["canary"] == ["c1"]  # one client: it is the canary
    page = http("GET", f"{stack.admin_url}/").body.decode()
    assert "Rollout" in page and "baking" in page and r["new"] in page


def test_worker_0_killed_mid_bake_carries_on_where_it_was(procs, tmp_path):
    rollout = {"canary": 1, "bake": 6, "min_requests": 5}
    stack, doc = _start(procs, tmp_path, rollout, clients=("c1", "c2"))
    _reload(stack, doc, "v2", [stack.backend_url], rollout)
    r = _canary_acked(stack)
    w0 = next(w["pid"] for w in get_json(f"{stack.admin_url}/admin/shards")["workers"] if w["worker"] == 0)
    os.kill(w0, signal.SIGKILL)
    wait_until(lambda: any(w["worker"] == 0 and w["pid"] != w0
                           for w in get_json(f"{stack.admin_url}/admin/shards")["workers"]), 30,
               what="worker 0 respawned", watch=stack.gateway)
    # The respawned worker 0 has the rollout as it was (same canary, same start), and promotes it.
    again = _rollout(stack)
    assert again["state"] == "baking" and again["canary"] == r["canary"] and again["started"] == r["started"]
    promoted = _wait_state(stack, "promoted", 30)
    assert promoted["new"] == r["new"]
    wait_until(lambda: all(v == {r["new"]} for v in _versions(stack).values()), 15, what="every client on v2")


def test_a_reload_of_a_bad_file_through_the_admin_port_changes_nothing(procs, tmp_path):
    rollout = {"canary": 1, "bake": 600}
    stack, doc = _start(procs, tmp_path, rollout, clients=("c1",))
    doc["groups"]["g1"]["rollout"] = {"canary": "0%", "bake": -1, "colour": "red"}
    stack.gateway_config.write_text(to_toml(doc))
    r = _post(stack, "/admin/reload")
    assert r.status == 400 and r.json()["error"] == "bad_config"
    lines = "\n".join(r.json()["errors"])
    for key in ("groups.g1.rollout.canary", "groups.g1.rollout.bake", "groups.g1.rollout.colour"):
        assert key in lines
    assert _rollout(stack)["state"] == "none" and _tags(stack, 4) == {"v1": 4}


class SlowEcho:
    """An upstream answering like the demo backend's /echo, 80 ms late (a slow new upstream)."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def echo(request: web.Request) -> web.Response:
            await asyncio.sleep(0.08)
            return web.json_response({"headers": [[k, v] for k, v in request.headers.items()]})

        async def main() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", echo)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
            self._started.set()

        self._loop.run_until_complete(main())
        self._loop.run_forever()

    def __enter__(self) -> "SlowEcho":
        self._thread.start()
        assert self._started.wait(10)
        return self

    def __exit__(self, *_: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_a_slower_canary_rolls_back_on_the_latency_ratio(procs, tmp_path):
    rollout = {"canary": 1, "bake": 60, "min_requests": 10, "max_latency_ratio": 2.0, "max_error_rate": 0.5}
    stack, doc = _start(procs, tmp_path, rollout, clients=("c1", "c2"))
    with SlowEcho() as slow:
        asked = _reload(stack, doc, "v2", [f"http://127.0.0.1:{slow.port}"], rollout)
        r = _canary_acked(stack)
        assert _tags(stack, 10).keys() == {"v1", "v2"}  # the slow upstream answers: no error, only late
        done = _wait_state(stack, "rolled_back", 40)
        print(f"reload to rolled_back on latency: {time.monotonic() - asked:.2f} s")
    assert done["new"] == r["new"] and "p99" in done["reason"] and "the rest's" in done["reason"]
    assert done["figures"]["canary"]["errors"] == 0 and done["figures"]["canary"]["p99_ms"] >= 80
    assert _tags(stack, 6) == {"v1": 6}


def test_without_rollout_tables_no_state_file_is_written(procs, tmp_path):
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    stack.start_gateway(settings={"workers": 2, "watch_config": False})
    stack.start_client("c1")
    assert get_json(f"{stack.admin_url}/admin/rollouts")["groups"] == {}
    doc = stack.gateway_doc(settings={"workers": 2, "watch_config": False})
    doc["groups"]["g1"]["rules"][0]["add_headers"] = {"x-rules": "v2"}
    stack.gateway_config.write_text(to_toml(doc))
    assert _post(stack, "/admin/reload").status == 200
    wait_until(lambda: _tags(stack, 2) == {"v2": 2}, 10, what="the change for every client at once")
    assert not (tmp_path / "gateway.toml.rollouts.json").exists()
