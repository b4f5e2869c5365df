#!/usr/bin/env python3
"""Run the demo: a backend, the gateway and one tunnel client with conf/*.toml.

Prints curl lines that go through the tunnel, then runs until Ctrl-C and
stops everything it started.
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What the demo listens on (conf/gateway.toml, conf/client.toml, the backend), all on loopback.
DEMO_PORTS = {8080: "the demo backend", 8001: "the gateway's HTTP entry", 8002: "the gateway's gRPC entry",
              50001: "the gateway's tunnel port", 9090: "the gateway's admin port",
              7001: "the client's local entry", 7002: "the client's status port"}


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP `port` (any address), from /proc/net/tcp and tcp6."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def port_holder(port: int) -> str:
    """The process listening on `port` ("pid 123 (python3 -m http.server)"), or "" when not to be seen
    (another user's process, no /proc)."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return ""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in wanted for fd in fds):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                return f"pid {pid} ({cmd.strip()[:120]})"
        except OSError:
            continue
    return ""


def busy_ports(ports: dict[int, str]) -> list[str]:
    """A line for each port of `ports` something else holds on loopback, naming the holder."""
    out = []
    for port, what in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT is no holder
            try:
                s.bind(("127.0.0.1", port))
                continue
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        holder = port_holder(port)
        out.append(f"port {port} ({what}) is in use" + (f" by {holder}" if holder else " (by a process not shown here)"))
    return out


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

    busy = busy_ports(DEMO_PORTS)
    if busy:
        print("demo: cannot start: " + "; ".join(busy) + ". Stop it (or change the ports in conf/*.toml); "
              "nothing was started.", file=sys.stderr)
        return 2
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
            "status page (the inspector will be there too):\n"
            "  http://127.0.0.1:9090/\n"
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
