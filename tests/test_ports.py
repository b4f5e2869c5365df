"""One gateway per port (issue 17, item 6): a port something listens on, a
gateway included, stops the start (exit 3, naming the port), though workers
bind with SO_REUSEPORT; a port only TIME_WAIT holds is free; two settings
naming one port is a config error (exit 2, naming both)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from gateway.config import load_gateway_config
from gateway.ports import claim_ports, port_clash
from gateway.settings import ConfigError
from tests.harness import ROOT, Stack, children_of, free_port, get_json, http, to_toml, wait_until

BASE = {"host": "0.0.0.0", "http_port": 8001, "grpc_port": 8002, "tunnel_port": 50001,
        "admin_host": "127.0.0.1", "admin_port": 9090}


@pytest.mark.parametrize("change,clash", [
    ({}, None),
    ({"admin_port": 8001}, ("http_port", "admin_port")),            # 0.0.0.0 overlaps 127.0.0.1
    ({"tunnel_port": 8002}, ("grpc_port", "tunnel_port")),
    ({"grpc_port": 0, "tunnel_port": 0, "admin_port": 0}, None),    # 0 is off, never a clash
    ({"host": "127.0.0.2", "admin_port": 8001}, None),              # two addresses, no overlap
    ({"host": "::", "admin_port": 8001}, ("http_port", "admin_port")),
    ({"host": "gw.internal", "admin_port": 8001}, ("http_port", "admin_port")),  # a name: may be the same
])
def test_port_clash(change, clash):
    assert port_clash({**BASE, **change}) == clash


def _run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_same_port_twice_is_a_config_error(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text(to_toml({"gateway": {"http_port": 8301, "admin_port": 8301}}))
    with pytest.raises(ConfigError) as err:
        load_gateway_config(str(path))
    assert err.value.key == "gateway.admin_port" and "gateway.http_port" in err.value.message
    for args in (("-c", str(path)), ("-c", "conf/gateway.toml", "--http-port", "8301", "--admin-port", "8301")):
        out = _run_cli(*args)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "admin_port" in out.stderr and "http_port" in out.stderr and "8301" in out.stderr
    assert _run_cli("check-config", str(path)).returncode == 2


def test_a_second_gateway_on_the_same_ports_exits_3(make_stack, procs, tmp_path):
    stack = make_stack(settings={"workers": 2})
    first = stack.gateway
    for port_key in ("http_port", "admin_port", "tunnel_port"):
        doc = stack.gateway_doc()
        # Only `port_key` is shared: every other port of the second gateway is free.
        for key in ("http_port", "admin_port", "tunnel_port", "grpc_port"):
            if key != port_key:
                doc["gateway"][key] = free_port()
        path = tmp_path / f"second-{port_key}.toml"
        path.write_text(to_toml(doc))
        out = _run_cli("-c", str(path), timeout=60)
        assert out.returncode == 3, (port_key, out.returncode, out.stderr[-2000:])
        assert f"port {doc['gateway'][port_key]} ({port_key}" in out.stderr, out.stderr[-2000:]
    # The first one never noticed: it serves every request, from its own workers.
    assert first.alive()
    for _ in range(20):
        assert http("GET", f"{stack.url}/hello").status == 200
    workers = get_json(f"http://127.0.0.1:{stack.admin_port}/admin/shards")["workers"]
    assert all(w["pid"] in children_of(first.popen.pid) for w in workers)


def _time_wait_on(port: int) -> int:
    """Sockets in TIME_WAIT whose local port is `port` (/proc/net/tcp, state 06)."""
    n = 0
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "06":
                n += 1
    return n


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return "zombie" not in fh.read()
    except FileNotFoundError:
        return False


def test_restart_right_after_kill_9(make_stack):
    stack = make_stack(settings={"workers": 2})
    # Keep-alive connections open at the crash: the dead gateway's side closes first
    # and leaves them in TIME_WAIT on its ports.
    callers = []
    for _ in range(8):
        c = socket.create_connection(("127.0.0.1", stack.http_port))
        c.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.recv(4096).startswith(b"HTTP/1.1 200")
        callers.append(c)
    pids = stack.gateway.pids()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    stack.gateway.popen.wait(5)
    wait_until(lambda: not any(_running(p) for p in pids), what="the old gateway gone")
    for c in callers:  # read to the dead side's FIN (unread bytes would make our close a RST), then close
        c.settimeout(5)
        while c.recv(65536):
            pass
        c.close()
    assert _time_wait_on(stack.http_port), "no TIME_WAIT left: the test would prove nothing"
    stack.start_gateway(stack.gateway_doc(settings={"workers": 2}))
    wait_until(lambda: stack._client_connected("c1"), what="c1 back", watch=stack.gateway)
    assert http("GET", f"{stack.url}/hello").status == 200
