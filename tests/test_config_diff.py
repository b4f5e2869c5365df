"""`tunnel-gateway check-config --diff FILE`: what a reload of FILE would change in the
running gateway, per group (rules, upstreams, limits) and beyond, read from the running
gateway's `GET /admin/config` (secrets left out, the admin token required when set)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway.config import load_gateway_config
from gateway.config_view import diff_configs, effective_config
from tests.harness import ROOT, TOKEN, Stack, free_port, http, to_toml, wait_until


def doc_of(stack: Stack, **settings) -> dict:
    doc = stack.gateway_doc(settings={"workers": 1, **settings})
    doc["groups"]["g2"] = {"tokens": ["t2"], "upstreams": {"web": {"servers": [stack.backend_url]}},
                           "rules": [{"name": "all", "path_prefix": "/", "upstream": "web"}]}
    doc["groups"]["g1"]["rules"] = [{"name": "api", "path_prefix": "/api", "upstream": "web"},
                                    {"name": "rest", "path_prefix": "/", "upstream": "web"}]
    return doc


def view(tmp_path: Path, doc: dict, name: str) -> dict:
    path = tmp_path / name
    path.write_text(to_toml(doc))
    return effective_config(load_gateway_config(str(path)))


def test_diff_names_each_change(tmp_path):
    stack = Stack(None, tmp_path)
    stack.backend_port = free_port()
    old = doc_of(stack)
    new = doc_of(stack)
    new["groups"]["g1"]["rules"][0]["path_prefix"] = "/v2"
    new["groups"]["g1"]["upstreams"]["web"]["servers"].append("http://127.0.0.1:9")
    new["groups"]["g1"]["max_inflight"] = 5
    new["groups"]["g1"]["rules"].append({"name": "extra", "path_prefix": "/x", "upstream": "web"})
    del new["groups"]["g2"]
    new["groups"]["g3"] = {"tokens": ["t3"], "upstreams": {}, "rules": []}
    new["routes"].append({"name": "more", "path_prefix": "/more", "group": "g3"})
    new["gateway"]["http_port"] = free_port()
    new["gateway"]["request_timeout"] = 12.0
    lines = diff_configs(view(tmp_path, old, "old.toml"), view(tmp_path, new, "new.toml"))
    text = "\n".join(lines)
    assert "groups.g1.limits.max_inflight: added (5)" in text, text
    assert "groups.g1.rules[api].path_prefix: '/api' -> '/v2'" in text
    assert "groups.g1.rules[extra]: added (-> 'web')" in text
    assert "groups.g1.upstreams.web: ['http://127.0.0.1:" in text and "'http://127.0.0.1:9']" in text
    assert "groups.g1: its clients get config " in text
    assert "groups.g2: removed (its clients get GOAWAY group_removed)" in text
    assert any(line.startswith("groups.g3: added (config ") for line in lines)
    assert "routes[more]: added (-> 'g3')" in text
    assert any(line.startswith("gateway.http_port:") and line.endswith("(takes a restart: a reload with it is refused)")
               for line in lines), text
    assert "gateway.request_timeout: 30.0 -> 12.0" in text
    assert lines.index(next(x for x in lines if x.startswith("groups."))) == 0  # groups first
    same = view(tmp_path, old, "same.toml")
    assert diff_configs(same, view(tmp_path, old, "again.toml")) == []  # another file, the same config


def test_a_reordered_rule_list_says_so(tmp_path):
    stack = Stack(None, tmp_path)
    stack.backend_port = free_port()
    old, new = doc_of(stack), doc_of(stack)
    new["groups"]["g1"]["rules"].reverse()
    lines = diff_configs(view(tmp_path, old, "a.toml"), view(tmp_path, new, "b.toml"))
    assert "groups.g1.rules: order changed (first match wins): ['rest', 'api']" in lines, lines


def test_check_config_diff_against_the_running_gateway(procs, tmp_path):
    admin_token = "adm-" + TOKEN
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    stack.gateway_doc()  # picks the ports
    path = tmp_path / "gateway.toml"

    def write(doc: dict) -> None:
        for key in ("http_port", "tunnel_port", "admin_port", "grpc_port"):
            doc["gateway"][key] = getattr(stack, key)
        path.write_text(to_toml(doc))

    write(doc_of(stack, admin_token=admin_token))
    stack.gateway = procs.start("gateway", [sys.executable, "-m", "gateway.cli", "-c", str(path)])
    wait_until(stack._gateway_ready, what="gateway /healthz", watch=stack.gateway)  # /healthz stays open
    assert http("GET", f"{stack.admin_url}/admin/config").status == 401  # the token rule

    def diff() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", "--diff", str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)

    out = diff()
    assert out.returncode == 0 and out.stdout.strip() == f"{path}: a reload changes nothing", (out.stdout, out.stderr)
    doc = doc_of(stack, admin_token=admin_token)
    doc["groups"]["g1"]["rate"] = 50
    doc["groups"]["g1"]["rules"][0]["path_prefix"] = "/v2"
    write(doc)
    out = diff()
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "groups.g1.limits.rate: added (50.0)" in out.stdout and "rules[api].path_prefix: '/api' -> '/v2'" in out.stdout
    assert admin_token not in out.stdout + out.stderr
    path.write_text(path.read_text().replace(admin_token, "wrong-token"))
    out = diff()
    assert out.returncode == 1 and "cannot read the running config" in out.stderr and "401" in out.stderr
