"""The README's demo command: everything it starts answers, and SIGTERM (as
`docker stop` or `kill` send it) stops every process it started."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.harness import ROOT, http, wait_until
from bench_stack import process_tree  # noqa: E402,I001  (scripts/ is on the path through tests.harness)

DEMO_PORTS = (8080, 8001, 50001, 9090, 7001, 7002)  # conf/gateway.toml, conf/client.toml, the backend


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_demo_serves_both_directions_and_sigterm_stops_everything():
    busy = [p for p in DEMO_PORTS if _busy(p)]
    if busy:
        pytest.skip(f"the demo's fixed ports are in use here: {busy}")
    demo = subprocess.Popen([sys.executable, "scripts/demo.py"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: http("GET", "http://127.0.0.1:8001/hello", timeout=2).status == 200, 60,
                   what="ingress through the demo")
        assert http("GET", "http://127.0.0.1:7001/hello", timeout=5).status == 200
        started = set(process_tree(demo.pid)) - {demo.pid}
        assert len(started) >= 3  # backend, gateway (and its workers), client
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(30) == 0
        wait_until(lambda: not any(os.path.exists(f"/proc/{p}") and _alive(p) for p in started), 15,
                   what="every demo process gone")
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        else:
            try:
                os.killpg(demo.pid, signal.SIGKILL)  # whatever a failed stop left behind
            except ProcessLookupError:
                pass

