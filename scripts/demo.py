#!/usr/bin/env python3
"""Run the demo: a backend, the gateway and one tunnel client with conf/*.toml.

Prints curl lines that go through the tunnel, then runs until Ctrl-C and
stops everything it started.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wait_http(url: str, what: str, procs: list[subprocess.Popen], timeout: float = 30.0, ok=(200,)) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"demo: {what}: a process exited early (code {p.returncode}); see the log above")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status in ok:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit(f"demo: {what} did not become ready within {timeout:.0f}s")


def main() -> int:
    py = sys.executable
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        p = subprocess.Popen([py, *args], cwd=ROOT)
        procs.append(p)
        return p

    def stop(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM (docker stop, kill) stops everything, as Ctrl-C does

    signal.signal(signal.SIGTERM, stop)
    try:
        start("scripts/demo_backend.py", "--port", "8080")
        wait_http("http://127.0.0.1:8080/stats", "backend", procs)
        start("-m", "gateway.cli", "-c", "conf/gateway.toml")
        wait_http("http://127.0.0.1:9090/healthz", "gateway", procs)
        start("-m", "gateway.client.main", "-c", "conf/client.toml")
        wait_http("http://127.0.0.1:7002/healthz", "tunnel client", procs)
        print(
            "\n=== tunnel-gateway demo is running ===\n"
            "ingress (public entry -> tunnel -> client -> backend):\n"
            "  curl -i http://127.0.0.1:8001/\n"
            "egress (client's local entry -> tunnel -> gateway -> backend):\n"
            "  curl -i http://127.0.0.1:7001/hello\n"
            "state:\n"
            "  curl -s http://127.0.0.1:9090/admin/shards\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
