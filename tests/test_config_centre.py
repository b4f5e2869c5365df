"""The gateway as config centre: hot config push, acks, bad edits."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from tests.harness import Stack, get_json, http, to_toml, wait_until


def _group(stack: Stack, tag: str, servers: list[str]) -> dict:
    return {
        "tokens": ["test-token"],
        "upstreams": {"web": {"servers": servers}},
        "rules": [{"path_prefix": "/", "upstream": "web", "add_headers": {"x-rules": tag}}],
    }


def _versions(stack: Stack) -> tuple[str, list[str]]:
    """(the gateway's version of g1, the versions its clients applied)."""
    shards = get_json(f"http://127.0.0.1:{stack.admin_port}/admin/shards")["workers"]
    clients = get_json(f"http://127.0.0.1:{stack.admin_port}/admin/clients")["clients"]
    return shards[0]["config_versions"]["g1"], [c["config_version"] for c in clients if c["group"] == "g1"]


def _rules_tag(stack: Stack) -> str:
    headers = dict((k.lower(), v) for k, v in http("GET", f"{stack.url}/echo").json()["headers"])
    return headers.get("x-rules", "")


@pytest.mark.parametrize("trigger", ["sighup", "file_change"])
def test_changed_rules_and_upstreams_reach_clients(procs, tmp_path, trigger):
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    doc = stack.gateway_doc(settings={"workers": 2, "watch_config": trigger == "file_change"},
                            groups={"g1": _group(stack, "v1", [stack.backend_url])})
    stack.start_gateway(doc)
    stack.start_client("c1")
    stack.start_client("c2")
    old_version, applied = _versions(stack)
    assert applied and set(applied) == {old_version}
    assert _rules_tag(stack) == "v1"

    async def in_flight_during_change():
        async with aiohttp.ClientSession() as s:
            task = asyncio.ensure_future(s.get(f"{stack.url}/slow?ms=1500&token=old"))
            await asyncio.sleep(0.3)
            # A changed rule (header) and a changed upstream (the same backend by another name).
            doc["groups"]["g1"] = _group(stack, "v2", [f"http://localhost:{stack.backend_port}"])
            stack.gateway_config.write_text(to_toml(doc))
            changed = time.monotonic()
            if trigger == "sighup":
                stack.gateway.popen.send_signal(signal.SIGHUP)
            r = await task
            return changed, r.status, await r.text()

    changed, status, body = asyncio.run(in_flight_during_change())
    assert (status, body) == (200, "old")

    def clients_on_new() -> bool:
        version, applied = _versions(stack)
        return version != old_version and len(applied) == 4 and set(applied) == {version}

    wait_until(clients_on_new, 5, interval=0.05, what="clients report the new version")
    assert time.monotonic() - changed < 2.5 + (1.0 if trigger == "file_change" else 0)
    assert _rules_tag(stack) == "v2"
    # A bad edit is rejected (the log names the key) and the old config keeps serving.
    good = stack.gateway_config.read_text()
    stack.gateway_config.write_text(good.replace('"upstream" = "web"', '"upstream" = "nowhere"'))
    if trigger == "sighup":
        stack.gateway.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: "config reload rejected" in stack.gateway.output(), 5, what="rejection logged")
    assert "groups.g1.rules[0].upstream" in stack.gateway.output()
    for _ in range(5):
        assert _rules_tag(stack) == "v2"
    stack.wait_idle()


def test_client_restarts_with_cached_config(procs, tmp_path):
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    stack.start_gateway()
    cache = tmp_path / "c1-config.json"
    stack.start_client("c1", extra=["--config-cache", str(cache)])
    wait_until(cache.exists, 5, what="config cache written")
    version = get_json(f"http://127.0.0.1:{stack.clients['c1'][2]}/status")["config_version"]
    stack.clients["c1"][0].stop()
    stack.gateway.stop()
    # The gateway is gone: the restarted client still knows its rules from the cache.
    stack.start_client("c1", wait=False, extra=["--config-cache", str(cache)])
    wait_until(lambda: get_json(f"http://127.0.0.1:{stack.clients['c1'][2]}/status")["config_version"] == version,
               10, what="cached config loaded")
