"""The first hour with the configuration (issue 19, part 4): every error of a file
at once, one `file: key: message` a line; a TOML syntax error's line and column;
the effective config with grpc_routes; warnings for a gateway that can serve
nothing; `tunnel-client check-config`; a `--server` that cannot be dialled;
`--log-level` in any case; a reload that asks for a restart naming every key;
the Docker image's default config. The programs run as real processes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from gateway.config import load_gateway_config, restart_only_change
from tests.harness import ROOT


def _run(module: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNNEL_GATEWAY_", "TUNNEL_CLIENT_"))}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def gateway_cli(*args: str) -> subprocess.CompletedProcess:
    return _run("gateway.cli", *args)


def client_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return _run("gateway.client.main", *args, timeout=timeout)


def error_lines(stderr: str, path: Path) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{path}: ")]


MANY_ERRORS = """
[gateway]
http_port = "8080"
log_levl = "info"
chunk_size = true

[groups.g1]
tokens = ["t"]
balance = "fastest"

[[routes]]
path_prefix = "api"
group = "g1"

[[routes]]
group = "nope"

[upstreams.out]
servers = ["ftp://x"]
"""


def test_check_config_reports_every_error_one_a_line(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(MANY_ERRORS)
    out = gateway_cli("check-config", str(path))
    assert out.returncode == 2 and out.stdout == ""
    lines = error_lines(out.stderr, path)
    keys = [line.split(": ")[1] for line in lines]
    assert keys == ["gateway.log_levl", "gateway.http_port", "gateway.chunk_size", "groups.g1.balance",
                    "routes[0].path_prefix", "routes[1].group", "upstreams.out.servers"], out.stderr
    # Each message quotes the value or name it refuses (and a likely meant name).
    assert "unknown key 'log_levl' (did you mean 'log_level'?)" in lines[0]
    assert "got '8080'" in lines[1] and "got True" in lines[2] and "'fastest'" in lines[3]
    assert "'api'" in lines[4] and "'nope'" in lines[5] and "'ftp://x'" in lines[6]
    assert "7 errors" in out.stderr
    # The gateway itself refuses to start with the same lines.
    run = gateway_cli("-c", str(path))
    assert run.returncode == 2 and error_lines(run.stderr, path) == lines


def test_a_toml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nhttp_port = 8001\nhost = "127.0.0.1\n')
    out = gateway_cli("check-config", str(path))
    assert out.returncode == 2
    assert re.search(rf"^{re.escape(str(path))}: line 3, column \d+: not valid TOML", out.stderr, re.M), out.stderr


def test_effective_config_has_grpc_routes_and_warns_of_nothing_to_serve(tmp_path):
    out = gateway_cli("check-config", "conf/gateway.toml")
    assert out.returncode == 0, out.stderr
    effective = json.loads(out.stdout)
    assert [r["name"] for r in effective["grpc_routes"]] == ["grpc-demo"]
    assert "warning" not in out.stderr
    bare = tmp_path / "bare.toml"
    bare.write_text("[gateway]\nhttp_port = 8001\n")
    out = gateway_cli("check-config", str(bare))
    assert out.returncode == 0, out.stderr  # valid: a warning, not an error
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and "groups" in warnings[0] and "routes" in warnings[1], out.stderr


def test_client_check_config(tmp_path):
    good = client_cli("check-config", "conf/client.toml")
    assert good.returncode == 0, good.stderr
    shown = json.loads(good.stdout)
    assert shown["client"]["group"] == "demo" and "demo-token" not in good.stdout
    bad = tmp_path / "client.toml"
    bad.write_text('[client]\nserver = "http://gw:50001,gw2"\nconections = 3\nlocal_port = -1\n')
    out = client_cli("check-config", str(bad))
    assert out.returncode == 2 and out.stdout == ""
    lines = error_lines(out.stderr, bad)
    assert [line.split(": ")[1] for line in lines] == [
        "client.conections", "client.server", "client.local_port", "client.group", "client.token"], out.stderr
    # Every element of the server list that cannot be dialled is named.
    assert "'http://gw:50001'" in lines[1] and "no scheme" in lines[1] and "'gw2'" in lines[1]


def test_an_undiallable_server_is_a_usage_error_at_start():
    for server, why in (("http://127.0.0.1:50001", "no scheme"), ("127.0.0.1", "PORT"),
                        ("127.0.0.1:50001,gw", "'gw'"), ("127.0.0.1:0", "port 0")):
        out = client_cli("--server", server, "--group", "g", "--token", "t", "--local-port", "0", timeout=20)
        assert out.returncode == 2, (server, out.stderr)
        assert "--server" in out.stderr and why in out.stderr and "reconnecting" not in out.stderr, out.stderr


def test_log_level_in_any_case():
    out = gateway_cli("check-config", "conf/gateway.toml", "--log-level", "DEBUG")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["gateway"]["log_level"] == "debug"
    out = client_cli("check-config", "conf/client.toml", "--log-level", "Warning")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["client"]["log_level"] == "warning"
    assert client_cli("check-config", "conf/client.toml", "--log-level", "loud").returncode == 2


def test_a_restart_change_names_every_key(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text("[gateway]\nhttp_port = 8001\nadmin_port = 9090\n")
    old = load_gateway_config(str(path))
    path.write_text("[gateway]\nhttp_port = 8101\nadmin_port = 9190\nrequest_timeout = 5.0\n")
    refused = restart_only_change(old, load_gateway_config(str(path)))
    assert refused is not None
    assert [e.key for e in refused.errors] == ["gateway.http_port", "gateway.admin_port"]
    assert "running with 8001, the file says 8101" in str(refused) and "9190" in str(refused)


def test_the_docker_image_serves_on_every_address_and_keeps_admin_on_loopback():
    text = (ROOT / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[0] == "tunnel-gateway"
    # The image's config is conf/gateway.toml, copied in.
    assert "cp conf/gateway.toml /etc/tunnel-gateway/gateway.toml" in text
    args = ["conf/gateway.toml" if a == "/etc/tunnel-gateway/gateway.toml" else a for a in cmd[1:]]
    args = [a for a in args if a not in ("--config", "-c")]
    out = gateway_cli("check-config", *args)
    assert out.returncode == 0, out.stderr
    effective = json.loads(out.stdout)["gateway"]
    assert effective["host"] == "0.0.0.0" and effective["admin_host"] == "127.0.0.1"
    # A non-loopback admin still needs its token.
    refused = gateway_cli("check-config", *args, "--admin-host", "0.0.0.0")
    assert refused.returncode == 2 and "admin_token" in refused.stderr
