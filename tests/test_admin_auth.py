"""Secure defaults (issue 17, item 11): the admin port off loopback asks for
admin_token (Bearer, 401 without), the gateway will not start off loopback
without one, check-config and logs mask secrets, and a plaintext tunnel off
loopback is warned about on both ends. Real processes on 127.0.0.1 (an admin
port on 0.0.0.0 is reached there too)."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest

from gateway.logs import JsonFormatter, TextFormatter
from tests.harness import ROOT, Stack, free_port, http, to_toml, wait_until

TOKEN_VALUE = "adm-S3cret-7f1"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def _exposed_gateway(procs, tmp_path) -> Stack:
    """Every port on 0.0.0.0, the admin port with a token, no TLS."""
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    doc = stack.gateway_doc(settings={"workers": 1, "host": "0.0.0.0", "admin_host": "0.0.0.0",
                                      "admin_token": TOKEN_VALUE})
    stack.gateway_config = tmp_path / "gateway.toml"
    stack.gateway_config.write_text(to_toml(doc))
    stack.gateway = procs.start("gateway", [sys.executable, "-m", "gateway.cli", "-c", str(stack.gateway_config)])
    wait_until(stack._gateway_ready, what="gateway /healthz", watch=stack.gateway)  # /healthz stays open
    return stack


def test_an_exposed_admin_port_asks_for_the_token_on_every_endpoint_but_healthz(procs, tmp_path):
    stack = _exposed_gateway(procs, tmp_path)
    admin = f"http://127.0.0.1:{stack.admin_port}"
    good = {"Authorization": f"Bearer {TOKEN_VALUE}"}
    for method, path, body in (("GET", "/admin/status", None), ("GET", "/admin/clients", None),
                               ("GET", "/admin/shards", None), ("GET", "/admin/cluster", None),
                               ("GET", "/", None), ("GET", "/metrics", None),
                               ("POST", "/admin/drain", b'{"worker": 0, "limit": 0}')):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN_VALUE},
                        {"Authorization": f"Bearer {TOKEN_VALUE}x"}):
            r = http(method, admin + path, body, headers)
            assert r.status == 401, (method, path, headers, r.status)
            assert r.header("WWW-Authenticate") == "Bearer"
        assert http(method, admin + path, body, good).status == 200, (method, path)
    assert http("GET", admin + "/healthz").status == 200
    # rebalance.py speaks it too.
    script = [sys.executable, "scripts/rebalance.py", "--admin", admin, "--dry-run"]
    assert subprocess.run(script, cwd=ROOT, capture_output=True, timeout=30).returncode == 2
    assert subprocess.run(script + ["--admin-token", TOKEN_VALUE], cwd=ROOT, capture_output=True,
                          timeout=30).returncode == 0
    out = stack.gateway.output()
    assert "tunnel port listens on 0.0.0.0 without TLS" in out
    warning = [json.loads(line) for line in out.splitlines() if "without TLS" in line][0]
    assert warning["level"] == "warning"
    assert TOKEN_VALUE not in out


def test_a_loopback_admin_port_without_a_token_stays_open_and_no_tls_warning(make_stack):
    stack = make_stack(client=None)
    admin = f"http://127.0.0.1:{stack.admin_port}"
    assert http("GET", admin + "/admin/clients").status == 200
    assert http("POST", admin + "/admin/drain", b'{"worker": 0, "limit": 0}').status == 200
    assert "without TLS" not in stack.gateway.output()


def test_an_exposed_admin_port_without_a_token_is_a_config_error(tmp_path):
    stack = Stack(None, tmp_path)
    stack.backend_port = free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(stack.gateway_doc(settings={"workers": 1, "admin_host": "0.0.0.0"})))
    for args in (("check-config", str(path)), ("-c", str(path))):
        out = _cli(*args)
        assert out.returncode == 2, out.stderr
        assert "gateway.admin_token" in out.stderr and "loopback" in out.stderr
    # ::1 and all of 127.0.0.0/8 are loopback: no token needed.
    for host in ("::1", "127.0.0.2"):
        assert _cli("check-config", str(path), "--admin-host", host).returncode == 0


def test_check_config_masks_every_secret(tmp_path):
    stack = Stack(None, tmp_path)
    stack.backend_port = free_port()
    doc = stack.gateway_doc(settings={"admin_host": "0.0.0.0", "admin_token": TOKEN_VALUE},
                            upstreams={"backend": {"servers": ["http://svc:pw-Upstream9@127.0.0.1:9"]}})
    doc["groups"]["g1"]["tokens"] = ["grp-Token-5e2"]
    doc["groups"]["g1"]["upstreams"]["web"]["servers"] = ["http://u:pw-Group4@127.0.0.1:9"]
    # Credentials a route adds to or matches on a request are secrets too; other headers are shown.
    doc["groups"]["g1"]["rules"][0]["add_headers"] = {"X-Api-Key": "grp-Key-3", "X-Env": "staging"}
    doc["routes"][0]["headers"] = {"X-Auth-Token": "rt-Match-4"}
    doc["forward"][0]["add_headers"] = {"Authorization": "Bearer fw-Secret-7", "Cookie": "sid=fw-Cookie-2"}
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(doc))
    out = _cli("check-config", str(path))
    assert out.returncode == 0, out.stderr
    for secret in (TOKEN_VALUE, "pw-Upstream9", "pw-Group4", "grp-Token-5e2", "grp-Key-3", "rt-Match-4",
                   "fw-Secret-7", "fw-Cookie-2"):
        assert secret not in out.stdout + out.stderr, secret
    effective = json.loads(out.stdout)
    assert effective["gateway"]["admin_token"] == "***"
    assert effective["upstreams"]["backend"]["servers"] == ["http://svc:***@127.0.0.1:9"]
    assert effective["groups"]["g1"]["tokens"] == 1
    assert ["x-env", "staging"] in effective["groups"]["g1"]["rules"][0]["add_headers"]
    assert ["authorization", "***"] in effective["forward"][0]["add_headers"]


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_logs_mask_passwords_in_urls(formatter):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    log = logging.getLogger("test.mask")
    log.addHandler(handler)
    try:
        log.warning("upstream %s: refused", "http://svc:pw-Log3@10.0.0.1:80/x",
                    extra={"server": "redis://:pw-Extra8@cache:6379/0"})
    finally:
        log.removeHandler(handler)
    line = stream.getvalue()
    assert "pw-Log3" not in line and "pw-Extra8" not in line
    assert "http://svc:***@10.0.0.1:80/x" in line and "redis://:***@cache:6379/0" in line


def test_a_client_warns_when_its_tunnel_to_a_remote_server_has_no_tls(procs):
    # 192.0.2.1 (TEST-NET-1) is nobody: the client only has to start and say it.
    client = procs.start("client", [sys.executable, "-m", "gateway.client.main", "--server", "192.0.2.1:50001",
                                    "--group", "g1", "--token", TOKEN_VALUE, "--client-id", "c1",
                                    "--local-port", "0", "--connect-timeout", "1"])
    wait_until(lambda: "without TLS" in client.output(), 15, what="the warning", watch=client)
    line = [json.loads(x) for x in client.output().splitlines() if "without TLS" in x][0]
    assert line["level"] == "warning" and "192.0.2.1:50001" in line["msg"]
    assert TOKEN_VALUE not in client.output()


def test_a_tokenless_loopback_admin_port_refuses_other_names_and_origins(make_stack):
    """A web page can rebind its name to 127.0.0.1 or post a form to the admin port: without
    a token, only loopback names and loopback pages are served (not /healthz's callers)."""
    stack = make_stack(client=None)
    admin = f"http://127.0.0.1:{stack.admin_port}"
    assert http("GET", admin + "/admin/requests", headers={"Host": f"localhost:{stack.admin_port}"}).status == 200
    for path in ("/admin/requests", "/admin/status", "/"):
        r = http("GET", admin + path, headers={"Host": f"evil.example:{stack.admin_port}"})
        assert r.status == 403 and "not a loopback name" in r.body.decode(), (path, r.body[:200])
    assert http("GET", admin + "/healthz", headers={"Host": "evil.example"}).status == 200
    r = http("POST", admin + "/admin/drain", b'{"worker": 0, "limit": 0}', {"Origin": "http://evil.example"})
    assert r.status == 403 and "not a loopback page" in r.body.decode()
    assert http("POST", admin + "/admin/drain", b'{"worker": 0, "limit": 0}',
                {"Origin": f"http://127.0.0.1:{stack.admin_port}"}).status == 200
