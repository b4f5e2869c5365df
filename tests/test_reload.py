"""A reload is parsed once, by the supervisor, and handed to every worker:
workers never read the config file themselves, so they cannot disagree."""
from __future__ import annotations

import os
import pickle
import signal
import stat

from gateway.config import load_gateway_config
from gateway.supervisor import Supervisor
from tests.harness import Stack, get_json, http, to_toml, wait_until


def test_handoff_is_the_parsed_config_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(Stack(None, tmp_path).gateway_doc()))
    config = load_gateway_config(str(path), None)
    sup = Supervisor(config, 2)
    try:
        sup._hand_off(config)
        mode = stat.S_IMODE(os.stat(sup.config_handoff).st_mode)
        assert mode == 0o600, oct(mode)  # it holds the groups' tokens
        with open(sup.config_handoff, "rb") as fh:
            assert pickle.load(fh) == config
        assert not [p for p in os.listdir(os.path.dirname(sup.config_handoff)) if p.startswith(".handoff-")]
    finally:
        if os.path.exists(sup.config_handoff):
            os.unlink(sup.config_handoff)
        os.close(sup._wake_r)
        os.close(sup._wake_w)


def test_workers_take_the_supervisors_parse_not_the_file(procs, tmp_path):
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    # No file watching: only the signals below reload.
    settings = {"workers": 2, "watch_config": False}
    stack.start_gateway(settings=settings)
    stack.start_client()
    url = f"{stack.url}/new/hello"
    assert http("GET", url).status == 404  # the backend has no /new/hello
    doc = stack.gateway_doc(settings=settings)
    doc["routes"] = [{"path_prefix": "/new", "group": "g1", "strip_prefix": True}, {"path_prefix": "/", "group": "g1"}]
    stack.gateway_config.write_text(to_toml(doc))

    # A worker told to reload on its own has nothing from the supervisor yet: it keeps its config.
    workers = get_json(f"http://127.0.0.1:{stack.admin_port}/admin/shards")["workers"]
    os.kill(workers[0]["pid"], signal.SIGHUP)
    wait_until(lambda: "config reload failed" in stack.gateway.output(), 10, what="the worker's refusal")
    assert all(http("GET", url, headers={"Connection": "close"}).status == 404 for _ in range(6))

    # The supervisor parses the file once; every worker then routes by it.
    stack.gateway.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: all(http("GET", url, headers={"Connection": "close"}).status == 200 for _ in range(10)), 10,
               what="the new route on every worker")
    out = stack.gateway.output()
    assert out.count("config reloaded; telling the workers") == 1
    assert out.count("config reload rejected") == 0
