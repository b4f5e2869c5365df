"""The fleet's Docker Compose stack (docker-compose.fleet.yml, issue 18 part 7),
checked as tests/test_compose.py checks docker-compose.yml: its structure
(Redis with a password and no published port, two nodes on one config file,
each its id and advertised name, admin on 127.0.0.1 only, clients given both
nodes) and each gateway's command line through check-config; then the same
topology runs as real processes on loopback (a password-protected
redis-server, node a on 127.0.0.2 and node b on 127.0.0.3 as in
tests/test_fleet.py), each with the command and environment the compose file
gives it, and a request through each node reaches the backend through a client."""
from __future__ import annotations

import subprocess
import sys
import tomllib

from gateway.client.config import load_client_config

from tests.harness import ROOT, Stack, free_port, get_json, http, to_toml, wait_until
from tests.redis_server import RedisServer
from tests.test_compose import (GATEWAY_PORTS, _command, _rewrite_gateway, _start_backend, _start_client, mounts,
                                published, services)
from tests.test_fleet import A, B, cluster

FLEET = ROOT / "docker-compose.fleet.yml"
NODES = {"gateway-a": "a", "gateway-b": "b"}  # service -> node id
CLIENTS = ("client-a", "client-b")
CONFIG = "/etc/tunnel-gateway/gateway.toml"


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def redis_password(svc: dict) -> str:
    return flag(svc["redis"]["command"], "--requirepass")


def test_fleet_compose_structure():
    svc = services(FLEET)
    assert set(svc) >= {"redis", "backend", *NODES, *CLIENTS}
    redis = svc["redis"]
    assert redis["image"].startswith("redis:") and redis["command"][0] == "redis-server"
    assert "ports" not in redis, "Redis is for the gateways only: no host port"
    password = redis_password(svc)
    files = set()
    for name, node_id in NODES.items():
        gateway = svc[name]
        argv = gateway["command"]
        assert argv[:3] == ["tunnel-gateway", "--workers", "2"]
        assert flag(argv, "--cluster") == f"redis://:{password}@redis:6379/0"
        assert (flag(argv, "--node-id"), flag(argv, "--advertise-host")) == (node_id, name)
        assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
        # Admin on this host's 127.0.0.1 only (issue 17), and a token in the file (admin_host is 0.0.0.0).
        assert all(str(p).startswith("127.0.0.1:") for p in gateway["ports"] if str(p).endswith(":9090"))
        assert 9090 in published(gateway)
        source = mounts(gateway)[CONFIG]
        files.add(source)
        assert source.is_file(), source
        assert tomllib.loads(source.read_text())["gateway"]["admin_token"]
        # The node's whole command line passes check-config (the file as its argument, the flags as given).
        rest = argv[1:argv.index("--config")] + argv[argv.index("--config") + 2:]
        check = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", str(source), *rest], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        assert f'"node_id": "{node_id}"' in check.stdout and password not in check.stdout
    assert len(files) == 1, "every node serves every group: one config file"
    host_ports = [published(s).values() for s in svc.values()]
    assert sum(map(len, host_ports)) == len(set().union(*host_ports)), "a host port published twice"
    groups = tomllib.loads(files.pop().read_text())["groups"]
    ids = set()
    for name in CLIENTS:
        client = svc[name]
        assert client["command"][0] == "tunnel-client"
        assert flag(client["command"], "--server") == ",".join(f"{n}:50001" for n in NODES)
        assert all(client["depends_on"][n]["condition"] == "service_healthy" for n in NODES)
        ids.add(client["environment"]["TUNNEL_CLIENT_CLIENT_ID"])
        for source in mounts(client).values():
            assert load_client_config(str(source)).group in groups
    assert len(ids) == 2, "the two clients need their own ids"


def _start_node(stack: Stack, service: dict, ports: dict[int, int], peer_port: int, names: dict[str, str]) -> None:
    """A gateway service as a local process on stack.host: its mounted file on loopback, its command
    with the compose names (Redis, the advertised service name) as the local ones."""
    files: dict = dict(names)
    for target, source in mounts(service).items():
        doc = _rewrite_gateway(tomllib.loads(source.read_text()), ports, stack.backend_url)
        doc["gateway"]["host"] = doc["gateway"]["admin_host"] = stack.host
        doc["gateway"]["peer_port"] = peer_port  # 7100 by default: a free one here
        files[target] = stack.tmp / f"{stack.name}-{source.name}"
        files[target].write_text(to_toml(doc))
    stack.gateway = stack.procs.start(stack.name, _command(service["command"], files))
    wait_until(stack._gateway_ready, 30, what=f"{stack.name} /healthz", watch=stack.gateway)


def test_fleet_compose_topology_as_local_processes(procs, tmp_path):
    svc = services(FLEET)
    password = redis_password(svc)
    (tmp_path / "redis").mkdir()
    with RedisServer(tmp_path / "redis", password=password) as redis:
        ports = {p: free_port() for p in GATEWAY_PORTS}
        peer_port = free_port()
        tunnel = ports[50001]
        names = {f"redis://:{password}@redis:6379/0": redis.url, "gateway-a": A, "gateway-b": B,
                 "gateway-a:50001,gateway-b:50001": f"{A}:{tunnel},{B}:{tunnel}"}
        nodes = {}
        for name, host in (("gateway-a", A), ("gateway-b", B)):
            stack = nodes[name] = Stack(procs, tmp_path, host=host, name=name)
            stack.http_port, stack.tunnel_port, stack.admin_port = ports[8001], tunnel, ports[9090]
            if name == "gateway-a":
                _start_backend(stack, svc["backend"])
            stack.backend_port = nodes["gateway-a"].backend_port
            _start_node(stack, svc[name], ports, peer_port, names)
        a, b = nodes["gateway-a"], nodes["gateway-b"]
        for name in CLIENTS:
            _start_client(a, name, svc[name], f"{A}:{tunnel}", names)

        def fleet_up(stack: Stack) -> bool:
            rows = cluster(stack)["nodes"]
            return ({r["node_id"]: r["state"] for r in rows} == {"a": "serving", "b": "serving"}
                    and sum(r["groups"].get("demo", 0) for r in rows) == 4 and stack.routable())

        watch = [a.gateway, b.gateway, *(proc for proc, _l, _a in a.clients.values())]
        for stack in (a, b):
            wait_until(lambda: fleet_up(stack), 30, what=f"{stack.name} sees both nodes and 4 streams", watch=watch)
        # Each client was given both nodes: a connection on each.
        for cid in ("client-a", "client-b"):
            assert len(a.client_status(cid)["placement"]) == 2
        for stack in (a, b):
            for _ in range(10):
                r = http("GET", f"{stack.url}/hello", headers={"Connection": "close"})
                assert r.status == 200 and len(r.body) == 100, (stack.name, r.body[:200])

        def served() -> int:
            return sum(row["requests_originated"] for s in (a, b)
                       for row in get_json(f"{s.admin_url}/admin/clients")["clients"])

        wait_until(lambda: served() == 20, 5, what="the 20 requests served by the clients")
        # Egress from client-a's local entry through a node's forward rule.
        r = http("GET", f"{a.local_url('client-a')}/hello")
        assert r.status == 200 and len(r.body) == 100
