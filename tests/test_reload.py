"""A reload is parsed once, by the supervisor, and handed to every worker:
workers never read the config file themselves, so they cannot disagree."""
from __future__ import annotations

import os
import pickle
import signal
import stat
import time

import pytest

from gateway.config import load_gateway_config
from gateway.supervisor import Supervisor
from gateway.workers.worker import read_handoff
from tests.harness import Stack, get_json, http, to_toml, wait_until


def test_handoff_is_the_parsed_config_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(Stack(None, tmp_path).gateway_doc()))
    config = load_gateway_config(str(path), None)
    sup = Supervisor(config, 2)
    folder = os.path.dirname(sup.config_handoff)
    try:
        sup._hand_off(config)
        # The folder is private and the file holds the groups' tokens.
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(sup.config_handoff).st_mode) == 0o600
        assert read_handoff(sup.config_handoff) == config
        assert os.listdir(folder) == ["config.pickle"]  # no temporary file left behind
    finally:
        sup.remove_handoff()
        os.close(sup._wake_r)
        os.close(sup._wake_w)
    assert not os.path.exists(folder)


def test_a_worker_unpickles_only_a_private_file_of_its_own_user(tmp_path):
    path = tmp_path / "config.pickle"
    path.write_bytes(pickle.dumps({"not": "a config"}))
    path.chmod(0o600)
    with pytest.raises(TypeError):
        read_handoff(str(path))
    path.chmod(0o644)
    with pytest.raises(PermissionError):
        read_handoff(str(path))
    link = tmp_path / "link.pickle"
    link.symlink_to(path)
    with pytest.raises(OSError):
        read_handoff(str(link))
    if os.geteuid() == 0:
        path.chmod(0o600)
        os.chown(path, 65534, -1)
        with pytest.raises(PermissionError):
            read_handoff(str(path))


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

    # A file that also moves a port is rejected whole: the port is bound until a restart, and the
    # rest of the file (a route dropped here) is not applied either.
    doc["routes"] = [{"path_prefix": "/", "group": "g1"}]
    doc["gateway"]["admin_port"] = stack.admin_port + 1
    stack.gateway_config.write_text(to_toml(doc))
    stack.gateway.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: "config reload rejected" in stack.gateway.output(), 10, what="the rejection")
    line = next(line for line in stack.gateway.output().splitlines() if "config reload rejected" in line)
    assert "admin_port: takes a restart" in line and str(stack.gateway_config) in line, line
    assert all(http("GET", url, headers={"Connection": "close"}).status == 200 for _ in range(6))
    assert get_json(f"http://127.0.0.1:{stack.admin_port}/healthz") is not None


def test_a_file_being_written_is_read_once_it_stands_still(procs, tmp_path):
    """The watcher reads a changed file only once it has stood still: a file written in two
    parts (its first half is no valid TOML) is reloaded whole, never rejected half-way."""
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    settings = {"workers": 1, "watch_config": True}
    stack.start_gateway(settings=settings)
    stack.start_client()
    doc = stack.gateway_doc(settings=settings)
    doc["routes"] = [{"path_prefix": "/new", "group": "g1", "strip_prefix": True}, {"path_prefix": "/", "group": "g1"}]
    text = to_toml(doc)
    with open(stack.gateway_config, "w") as fh:
        fh.write(text[: len(text) // 2])
        fh.flush()
        time.sleep(0.15)  # makes the half-written state last (the watcher looks every 0.5 s at most)
        fh.write(text[len(text) // 2:])
    wait_until(lambda: http("GET", f"{stack.url}/new/hello").status == 200, 10, what="the new route")
    out = stack.gateway.output()
    assert "config reload rejected" not in out and out.count("config file changed on disk") == 1, out
