"""Real processes on real sockets: start a backend, a gateway and clients on
free loopback ports, wait for readiness by polling, and stop them all.

Starting, watching and stopping processes, free ports and JSON from an admin
port are scripts/bench_stack.py's (one harness for the tests and the
benchmarks, which must not import from tests/); they are re-exported here."""
from __future__ import annotations

import datetime
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token"
STOP_TIMEOUT = 5.0  # a test's process not gone this long after SIGTERM is killed

sys.path.insert(0, str(ROOT / "scripts"))
from bench_stack import (  # noqa: E402,F401  (the one process harness, for tests and benchmarks)
    NOT_READY, ProcGroup, ProcessExited, Processes, children_of, drain_all_but, free_port, get_json, routable,
    wait_until,
)
from gateway.client.agent import REBALANCE_EVERY  # noqa: E402
from gateway.client.worker_spread import TRIES_PER_WORKER  # noqa: E402

CONNECT_TIMEOUT = 15.0  # a client's start, up to its connections routable


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30) -> Response:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Response(r.status, list(r.headers.items()), r.read())
    except urllib.error.HTTPError as e:
        return Response(e.code, list(e.headers.items()), e.read())


def self_signed_tls(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway certificate for localhost in `directory`: (a server's context, a client's that trusts it)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(directory / "k.pem"),
                    "-out", str(directory / "c.pem"), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(directory / "c.pem", directory / "k.pem")
    client = ssl.create_default_context(cafile=directory / "c.pem")
    client.check_hostname = False
    return server, client


def toml_value(v: Any) -> str:
    if isinstance(v, datetime.datetime):
        return v.isoformat().replace("+00:00", "Z")
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(doc: dict) -> str:
    """Enough TOML for our configs: tables, arrays of tables, inline values."""
    lines: list[str] = []

    def emit(prefix: str, table: dict) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))}
        for k, v in scalars.items():
            lines.append(f"{json.dumps(k)} = {toml_value(v)}")
        for k, v in table.items():
            if isinstance(v, dict):
                lines.append(f"\n[{prefix}{json.dumps(k)}]")
                emit(f"{prefix}{json.dumps(k)}.", v)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    lines.append(f"\n[[{prefix}{json.dumps(k)}]]")
                    emit(f"{prefix}{json.dumps(k)}.", item)

    emit("", doc)
    return "\n".join(lines) + "\n"


@dataclass
class Stack:
    procs: Processes
    tmp: Path
    host: str = "127.0.0.1"  # the gateway's host and admin_host (a fleet's nodes: 127.0.0.2, 127.0.0.3, ...)
    name: str = "gateway"  # its process's name (and log's)
    backend_port: int = 0
    http_port: int = 0
    tunnel_port: int = 0
    admin_port: int = 0
    grpc_port: int = 0
    gateway: ProcGroup | None = None
    gateway_config: Path | None = None
    clients: dict[str, tuple[ProcGroup, int, int]] = field(default_factory=dict)  # id -> (proc, local, admin)
    backend: ProcGroup | None = None
    # A command every process of this stack runs under, e.g. ["ip", "netns", "exec", NS]: it must
    # exec the rest in place (so stopping the process stops what runs), as `ip netns exec` does.
    prefix: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    def local_url(self, client_id: str = "c1") -> str:
        return f"http://127.0.0.1:{self.clients[client_id][1]}"

    def status(self) -> dict:
        return get_json(f"{self.admin_url}/admin/status")

    def client_status(self, client_id: str = "c1") -> dict:
        return get_json(f"http://127.0.0.1:{self.clients[client_id][2]}/status")

    def streams(self, group: str = "g1") -> int:
        return self.status()["groups"].get(group, 0)

    def start_backend(self, name: str = "backend") -> ProcGroup:
        self.backend_port = self.backend_port or free_port()
        self.backend = self.procs.start(name, [*self.prefix, sys.executable, "scripts/demo_backend.py", "--port",
                                               str(self.backend_port)])
        wait_until(lambda: http("GET", f"{self.backend_url}/stats", timeout=2).status == 200, what="backend",
                   watch=self.backend)
        # Another process on the port would answer too: make sure it is ours.
        assert http("GET", f"{self.backend_url}/stats").json()["pid"] == self.backend.popen.pid, "backend port taken"
        return self.backend

    def gateway_doc(self, settings: dict | None = None, groups: dict | None = None, routes: list | None = None,
                    forward: list | None = None, upstreams: dict | None = None) -> dict:
        backend = self.backend_url
        self.http_port = self.http_port or free_port()
        self.tunnel_port = self.tunnel_port or free_port()
        self.admin_port = self.admin_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        return {
            "gateway": {
                "host": self.host, "admin_host": self.host, "http_port": self.http_port, "tunnel_port": self.tunnel_port,
                "admin_port": self.admin_port, "grpc_port": self.grpc_port, "log_level": "info",
                "log_format": "json",
                "heartbeat_interval": 1.0, "shutdown_grace": 3.0, **(settings or {}),
            },
            "groups": groups if groups is not None else {
                "g1": {
                    "tokens": [TOKEN],
                    "upstreams": {"web": {"servers": [backend]}},
                    "rules": [{"path_prefix": "/", "upstream": "web"}],
                }
            },
            "routes": routes if routes is not None else [{"path_prefix": "/", "group": "g1", "timeout": 10.0}],
            "forward": forward if forward is not None else [{"path_prefix": "/", "upstream": "backend"}],
            "upstreams": upstreams if upstreams is not None else {"backend": {"servers": [backend]}},
        }

    def start_gateway(self, doc: dict | None = None, **kw: Any) -> ProcGroup:
        doc = doc or self.gateway_doc(**kw)
        self.gateway_config = self.tmp / "gateway.toml"
        self.gateway_config.write_text(to_toml(doc))
        self.gateway = self.procs.start(self.name, [*self.prefix, sys.executable, "-m", "gateway.cli", "-c",
                                                    str(self.gateway_config)])
        wait_until(self._gateway_ready, what="gateway /healthz", watch=self.gateway)
        shards = get_json(f"{self.admin_url}/admin/shards")["workers"]
        assert all(w["pid"] in children_of(self.gateway.popen.pid) for w in shards), "admin port taken"
        return self.gateway

    def _gateway_ready(self) -> bool:
        """The admin port answers /healthz (wait on it watching the gateway process)."""
        return http("GET", f"{self.admin_url}/healthz", timeout=2).status == 200

    def start_client(self, client_id: str = "c1", group: str = "g1", token: str = TOKEN, wait: bool = True,
                     extra: list[str] | None = None) -> ProcGroup:
        local, admin = (self.clients[client_id][1:] if client_id in self.clients else (free_port(), free_port()))
        args = [
            *self.prefix, sys.executable, "-m", "gateway.client.main", "--server", f"{self.host}:{self.tunnel_port}",
            "--group", group, "--token", token, "--client-id", client_id,
            "--local-port", str(local), "--admin-port", str(admin), "--reconnect-initial", "0.2",
            "--reconnect-max", "2", *(extra or []),
        ]
        proc = self.procs.start(f"client-{client_id}", args)
        self.clients[client_id] = (proc, local, admin)
        if wait:
            spreads = "--no-spread-workers" not in (extra or [])
            wait_until(lambda: self._client_connected(client_id, spreads), self._connect_timeout(spreads),
                       what=f"client {client_id} connected", watch=(proc, self.gateway))
        return proc

    def _connect_timeout(self, spreads: bool) -> float:
        """CONNECT_TIMEOUT, and for a client that spreads its connections over the workers, the
        moves its spread may take: the kernel places each new connection by a hash of its
        addresses (SO_REUSEPORT), so a move reaches a worker none of the others holds with
        chance 1/2 on two workers, a move every REBALANCE_EVERY, up to TRIES_PER_WORKER x
        workers of them (gateway/client/worker_spread.py). CONNECT_TIMEOUT alone covered a
        dozen moves: one start in some thousands timed out."""
        if not spreads:
            return CONNECT_TIMEOUT
        try:
            workers = len(get_json(f"{self.admin_url}/admin/shards")["workers"])
        except NOT_READY:
            workers = os.cpu_count() or 1  # the gateway's default: a worker per core
        return CONNECT_TIMEOUT + TRIES_PER_WORKER * workers * (REBALANCE_EVERY + 0.5)

    def _client_connected(self, client_id: str, spreads: bool = False) -> bool:
        """Every tunnel connection of the client is up and routable (wait on it watching the client)
        and, when it spreads them over the workers (by default), spread: a test starts from
        connections that stay (gateway/client/worker_spread.py)."""
        st = self.client_status(client_id)
        if st["connections"] < st.get("wanted", 1):
            return False
        if spreads:
            here = [p["worker"] for p in st["placement"] if p["node"] == f"{self.host}:{self.tunnel_port}"]
            workers = len(get_json(f"{self.admin_url}/admin/shards")["workers"])
            if len(set(here)) < min(workers, len(here)) or st["draining"]:  # moving, or a moved one ending
                return False
        return self.routable()

    def routable(self) -> bool:
        """Every worker sees every stream of every group (its own or through the router)."""
        return routable(get_json(f"{self.admin_url}/admin/shards")["workers"])

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Every pending table on every hop is empty."""

        def idle() -> bool:
            st = self.status()
            if st["pending"] or st["serving"]:
                return False
            for cid, (proc, _l, _a) in self.clients.items():
                if proc.alive():
                    cs = self.client_status(cid)
                    if cs["pending"] or cs["serving"]:
                        return False
            return True

        wait_until(idle, timeout, what="pending tables empty", watch=self.gateway)


def frames_to(stack: Stack, client_id: str) -> dict[str, int]:
    """Frames the gateway has sent on each stream of `client_id`, by connection (/admin/clients)."""
    rows = get_json(f"{stack.admin_url}/admin/clients")["clients"]
    return {c["connection"]: c["frames_out"] for c in rows if c["client_id"] == client_id}


def wait_heartbeats(stack: Stack, n: int, client_id: str = "c1", timeout: float = 30.0) -> None:
    """Let `n` heartbeat intervals pass on the gateway's clock: a wait for something that
    must NOT happen meanwhile, in place of a sleep. Each interval the gateway sends a
    PING on each stream of a connected client and answers the client's own PING there
    (both sides beat at heartbeat_interval): 2n frames more on every stream of
    `client_id` take the gateway at least n intervals, however slowly the machine runs."""
    base = frames_to(stack, client_id)
    assert base, f"{client_id} has no stream to count heartbeats on"
    wait_until(lambda: all(frames_to(stack, client_id).get(k, -1) >= v + 2 * n for k, v in base.items()), timeout,
               what=f"{n} heartbeats to {client_id}", watch=(stack.gateway, stack.clients[client_id][0]))


def standard_stack(procs: Processes, tmp: Path, *, settings: dict | None = None, routes: list | None = None,
                   edit: Callable[[Stack, dict], None] | None = None, client: str | None = "c1",
                   client_extra: list[str] | None = None, host: str = "127.0.0.1", name: str = "gateway",
                   like: Stack | None = None) -> Stack:
    """The stack most tests start: the backend, the gateway (gateway_doc's config with
    `settings` in [gateway] and `routes` instead of the default; `edit(stack, doc)` changes
    the config further, e.g. groups of its own: the backend is at stack.backend_url) and,
    unless `client` is None, that client of g1 connected (with `client_extra` arguments).
    The gateway listens on `host` (its admin port too); with `like`, it is another gateway
    beside that one (a fleet's node): the same ports on its own address, and no backend of
    its own (`like`'s). Through the make_stack fixtures of conftest.py, which stop every
    process after the test or the module, passed or failed."""
    stack = Stack(procs, tmp, host=host, name=name)
    if like is None:
        stack.start_backend()
    else:
        for key in ("backend_port", "http_port", "tunnel_port", "admin_port", "grpc_port"):
            setattr(stack, key, getattr(like, key))
    doc = stack.gateway_doc(settings=settings, routes=routes)
    if edit is not None:
        edit(stack, doc)
    stack.start_gateway(doc)
    if client is not None:
        stack.start_client(client, extra=client_extra)
    return stack


def shards(stack: Stack) -> list[dict]:
    return get_json(f"{stack.admin_url}/admin/shards")["workers"]


def streams_by_worker(stack: Stack) -> dict[int, int]:
    return {w["worker"]: sum(w["streams"].values()) for w in shards(stack)}


def drain(stack: Stack, **selection: Any) -> dict:
    body = json.dumps(selection).encode()
    return http("POST", f"{stack.admin_url}/admin/drain", body,
                {"Content-Type": "application/json"}).json()


def concentrate(stack: Stack, worker: int, expected: int, workers: int = 2, timeout: float = 40.0) -> None:
    """Drain the other workers until all `expected` streams sit on `worker`."""

    def done() -> bool:
        counts = streams_by_worker(stack)
        if len(counts) < workers or sum(counts.values()) < expected:
            return False
        if counts.get(worker, 0) == expected and stack.routable():
            return True
        drain_all_but(stack.admin_url, counts, worker)
        return False

    wait_until(done, timeout, interval=0.5, what=f"all streams on worker {worker}", watch=stack.gateway)


def proc_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


# -- helpers for the end-to-end failure, faithfulness and body tests ---------------


def raw_request(port: int, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                body: bytes | None = None, timeout: float = 30, conn: Any = None) -> Response:
    """One request exactly as given: the target is not re-quoted, headers keep
    their order and repeats, nothing is added but Host (when not given) and
    Content-Length (for a body). Pass `conn` (an http.client connection) to
    send several requests on one keep-alive connection."""
    import http.client

    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        headers = list(headers or [])
        if not any(n.lower() == "host" for n, _ in headers):
            c.putheader("Host", f"127.0.0.1:{port}")
        for n, v in headers:
            c.putheader(n, v)
        if body is not None and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers):
            c.putheader("Content-Length", str(len(body)))
        c.endheaders(body)
        r = c.getresponse()
        return Response(r.status, r.getheaders(), r.read())
    finally:
        if own:
            c.close()


def header_values(headers: list[tuple[str, str]] | list[list[str]], name: str) -> list[str]:
    """Every value of `name`, in order (repeats kept)."""
    return [v for n, v in headers if n.lower() == name.lower()]


def backend_stats(stack: Stack) -> dict:
    return get_json(f"{stack.backend_url}/stats")


def signal_client(stack: Stack, client_id: str, sig: int) -> None:
    proc = stack.clients[client_id][0]
    if proc.alive():
        os.kill(proc.popen.pid, sig)


def stream_rows(stack: Stack) -> list[dict]:
    """Every client stream the gateway holds (/admin/status)."""
    return stack.status()["streams"]
