"""The Docker Compose stack. Docker cannot run here, so: its structure is
checked (services, ports, mounted files that exist and pass validation), and
the same topology runs as real processes on loopback, each with the command
and environment the compose file gives it, and a request goes through it."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.harness import ROOT, Stack, free_port, get_json, http, to_toml, wait_until

COMPOSE = ROOT / "docker-compose.yml"
# DESIGN.md's ports: HTTP entry, gRPC entry, tunnel, admin; a client's local entry.
GATEWAY_PORTS = {8001, 8002, 50001, 9090}


def services(compose: Path = COMPOSE) -> dict[str, dict]:
    return yaml.safe_load(compose.read_text())["services"]


def mounts(service: dict) -> dict[str, Path]:
    """Container path -> the repository file mounted there."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        out[target] = (ROOT / source).resolve()
    return out


def published(service: dict) -> dict[int, int]:
    """Container port -> host port."""
    out = {}
    for spec in service.get("ports", []):
        host, container = str(spec).split(":")[-2:]
        out[int(container)] = int(host)
    return out


def test_compose_structure():
    svc = services()
    assert set(svc) >= {"gateway", "client-a", "client-b", "backend"}
    gateway = svc["gateway"]
    assert gateway["command"][:3] == ["tunnel-gateway", "--workers", "2"]
    assert set(published(gateway)) == GATEWAY_PORTS and set(published(gateway).values()) == GATEWAY_PORTS
    # The admin port is this host's only (issue 17): published on 127.0.0.1, not every interface.
    assert [str(p) for p in gateway["ports"] if str(p).endswith(":9090")] == ["127.0.0.1:9090:9090"]
    ids = set()
    for name in ("client-a", "client-b"):
        client = svc[name]
        assert client["command"][0] == "tunnel-client"
        assert client["depends_on"]["gateway"]["condition"] == "service_healthy"
        ids.add(client["environment"]["TUNNEL_CLIENT_CLIENT_ID"])
        assert 7001 in published(client)
    assert len(ids) == 2, "the two clients need their own ids"
    # Every mounted file exists in the repository and passes validation.
    for target, source in mounts(gateway).items():
        assert source.is_file(), source
        assert target in gateway["command"]
        check = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", str(source)], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    from gateway.client.config import load_client_config

    for name in ("client-a", "client-b"):
        for source in mounts(svc[name]).values():
            assert source.is_file(), source
            cfg = load_client_config(str(source))
            assert cfg.server.split(":")[0] == "gateway" and cfg.group in tomllib.loads(
                mounts(gateway)["/etc/tunnel-gateway/gateway.toml"].read_text())["groups"]


def test_dockerfile_runs_unprivileged_with_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*healthz", text, re.M | re.S)
    for p in GATEWAY_PORTS:
        assert str(p) in re.search(r"^EXPOSE (.*)$", text, re.M).group(1)


def _rewrite_gateway(doc: dict, ports: dict[int, int], backend: str) -> dict:
    """Compose addresses -> loopback: service names, 0.0.0.0, published ports."""
    g = doc["gateway"]
    g["host"] = g["admin_host"] = "127.0.0.1"
    g.pop("admin_token", None)  # on loopback here: the harness reads the admin port without it
    for key in ("http_port", "grpc_port", "tunnel_port", "admin_port"):
        g[key] = ports[g[key]]
    text = to_toml(doc).replace("http://backend:8080", backend)
    return tomllib.loads(text)


def _command(argv: list[str], files: dict[str, Path | str]) -> list[str]:
    """The compose command as a local process: console scripts as modules, mounted paths as the local
    copies (and any other argument `files` names, e.g. a service's address, as its local one)."""
    exe = {"tunnel-gateway": [sys.executable, "-m", "gateway.cli"],
           "tunnel-client": [sys.executable, "-m", "gateway.client.main"],
           "python": [sys.executable]}
    return exe[argv[0]] + [str(files.get(a, a)) for a in argv[1:]]


def _start_backend(stack: Stack, service: dict) -> None:
    """The backend service's own command, on 127.0.0.1 and a free port."""
    stack.backend_port = free_port()
    backend_cmd = [str(stack.backend_port) if a == "8080" else a for a in service["command"]]
    backend_cmd = ["127.0.0.1" if a == "0.0.0.0" else a for a in backend_cmd]
    stack.backend = stack.procs.start("backend", _command(backend_cmd, {}))
    wait_until(lambda: http("GET", f"{stack.backend_url}/health", timeout=2).status == 200, what="backend",
               watch=stack.backend)


def _start_client(stack: Stack, name: str, client: dict, server: str, names: dict[str, str] | None = None) -> None:
    """A client service as a local process: its mounted file with the gateway at `server` and its
    entries on 127.0.0.1, its command with `names` (compose argument -> local one) replaced."""
    files: dict[str, Path | str] = dict(names or {})
    for target, source in mounts(client).items():
        doc = tomllib.loads(source.read_text())
        c = doc["client"]
        c["server"] = server
        c["local_host"] = c["admin_host"] = "127.0.0.1"
        files[target] = stack.tmp / f"{name}-{source.name}"
        files[target].write_text(to_toml(doc))
    local, admin = free_port(), free_port()
    # Two containers may share 7001/7002; two local processes may not: the
    # environment (above the file in precedence) moves them.
    env = {k: str(v) for k, v in client.get("environment", {}).items()}
    env.update(TUNNEL_CLIENT_LOCAL_PORT=str(local), TUNNEL_CLIENT_ADMIN_PORT=str(admin))
    proc = stack.procs.start(name, _command(client["command"], files), env=env)
    stack.clients[env["TUNNEL_CLIENT_CLIENT_ID"]] = (proc, local, admin)


def test_compose_topology_as_local_processes(procs, tmp_path):
    svc = services()
    stack = Stack(procs, tmp_path)
    _start_backend(stack, svc["backend"])

    ports = {p: free_port() for p in GATEWAY_PORTS}
    stack.http_port, stack.tunnel_port, stack.admin_port = ports[8001], ports[50001], ports[9090]
    gateway = svc["gateway"]
    local_files: dict[str, Path] = {}
    for target, source in mounts(gateway).items():
        doc = _rewrite_gateway(tomllib.loads(source.read_text()), ports, stack.backend_url)
        local_files[target] = tmp_path / source.name
        local_files[target].write_text(to_toml(doc))
    stack.gateway = procs.start("gateway", _command(gateway["command"], local_files))
    wait_until(stack._gateway_ready, 30, what="gateway /healthz", watch=stack.gateway)
    # --workers 2 from the compose command: both announce themselves.
    wait_until(lambda: len(get_json(f"http://127.0.0.1:{stack.admin_port}/admin/shards")["workers"]) == 2, 10,
               what="two workers")

    for name in ("client-a", "client-b"):
        _start_client(stack, name, svc[name], f"127.0.0.1:{stack.tunnel_port}")

    def both_connected() -> bool:
        rows = get_json(f"http://127.0.0.1:{stack.admin_port}/admin/clients")["clients"]
        return {r["client_id"] for r in rows} == {"client-a", "client-b"} and stack.routable()

    wait_until(both_connected, 30, what="both clients connected",
               watch=[stack.gateway, *(proc for proc, _l, _a in stack.clients.values())])
    for _ in range(20):
        r = http("GET", f"{stack.url}/hello", headers={"Connection": "close"})
        assert r.status == 200 and len(r.body) == 100, r.body[:200]

    def served_by() -> dict[str, int]:
        out: dict[str, int] = {}
        for row in get_json(f"http://127.0.0.1:{stack.admin_port}/admin/clients")["clients"]:
            out[row["client_id"]] = out.get(row["client_id"], 0) + row["requests_originated"]
        return out

    # Round robin over the group: both clients served, 20 in all (the table is announced, so poll).
    wait_until(lambda: sum(served_by().values()) == 20 and min(served_by().values()) > 0, 5,
               what="both clients served the 20 requests")
    # Egress from client-a's local entry through the gateway's forward rule.
    r = http("GET", f"{stack.local_url('client-a')}/hello")
    assert r.status == 200 and len(r.body) == 100
    stack.wait_idle()
