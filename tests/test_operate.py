"""Operating the gateway: metrics, access log, CLI precedence, check-config."""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import aiohttp

from tests.harness import ROOT, Stack, http, wait_until


def _scrape(stack: Stack) -> str:
    return http("GET", f"http://127.0.0.1:{stack.admin_port}/metrics").body.decode()


def _sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_one_scrape_adds_up_both_workers(procs, tmp_path):
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    stack.start_gateway(settings={"workers": 2, "access_log": "off"})
    stack.start_client("c1", extra=["--connections", "2"])

    async def send(n: int):
        conn = aiohttp.TCPConnector(force_close=True)  # new connections spread over the workers
        async with aiohttp.ClientSession(connector=conn) as s:
            async def one(i):
                async with s.get(f"{stack.url}/hello") as r:
                    await r.read()
                    return r.status
            return await asyncio.gather(*(one(i) for i in range(n)))

    statuses = asyncio.run(send(200))
    assert statuses == [200] * 200
    text = _scrape(stack)
    assert _sum(text, "tunnel_requests_total", direction="ingress", status_class="2xx") == 200
    # Both workers answered some of them.
    per_worker = [w["requests"] for w in json.loads(http("GET", f"http://127.0.0.1:{stack.admin_port}/admin/shards").body)["workers"]]
    assert len(per_worker) == 2
    assert _sum(text, "tunnel_request_duration_seconds_count", direction="ingress") == 200
    assert _sum(text, "tunnel_client_connects_total", group="g1") >= 2
    wait_until(lambda: _sum(_scrape(stack), "tunnel_streams", group="g1") == 2, 5, what="stream gauge")
    assert 'tunnel_config_version_info{group="g1"' in text


def test_access_log_one_line_per_request_also_for_errors(procs, tmp_path):
    log_file = tmp_path / "access.log"
    stack = Stack(procs, tmp_path)
    stack.start_backend()
    doc = stack.gateway_doc(settings={"access_log": str(log_file), "workers": 2})
    doc["routes"] = [
        {"path_prefix": "/slowroute", "group": "g1", "timeout": 0.5, "strip_prefix": True},
        {"path_prefix": "/nogroup", "group": "g2"},
        {"path_prefix": "/", "group": "g1"},
    ]
    doc["groups"]["g2"] = {"tokens": ["x"], "upstreams": {"u": {"servers": [stack.backend_url]}},
                           "rules": [{"path_prefix": "/", "upstream": "u"}]}
    stack.start_gateway(doc)
    stack.start_client("c1")
    seen = {}
    for path, status in [("/hello", 200), ("/status/502", 502), ("/nogroup/x", 503),
                         ("/slowroute/slow?ms=2000", 504), ("/status/404", 404)]:
        r = http("GET", stack.url + path)
        assert r.status == status, (path, r.status)
        seen[r.header("x-request-id")] = status
    r = http("GET", f"http://127.0.0.1:{stack.admin_port}/nothing")  # admin requests are not access-logged
    wait_until(lambda: log_file.exists() and len(log_file.read_text().splitlines()) >= len(seen), 5,
               what="access log lines")
    lines = [json.loads(l) for l in log_file.read_text().splitlines()]
    assert {l["request_id"]: l["status"] for l in lines} == seen
    assert len(lines) == len(seen)
    for l in lines:
        assert l["trace_id"] and l["direction"] == "ingress" and l["worker"] in ("0", "1")
        assert set(l) >= {"time", "method", "host", "path", "bytes_in", "bytes_out", "duration", "group",
                          "client_id", "error"}
    by_status = {l["status"]: l for l in lines}
    assert by_status[503]["error"] == "no_client_available"
    assert by_status[504]["error"] == "timeout"
    assert by_status[200]["bytes_out"] == 100 and by_status[200]["client_id"] == "c1"


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**os.environ, **(env or {})})


def test_check_config_good_and_bad(tmp_path):
    good = _run_cli("check-config", "conf/gateway.toml")
    assert good.returncode == 0, good.stderr
    effective = json.loads(good.stdout)
    assert effective["gateway"]["http_port"] == 8001
    assert "demo-token" not in good.stdout  # tokens are never printed
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "conf/gateway.toml").read_text().replace('group = "demo"', 'group = "nope"'))
    out = _run_cli("check-config", str(bad))
    assert out.returncode == 2
    assert "routes[0].group" in out.stderr and str(bad) in out.stderr


def test_precedence_flag_over_env_over_file():
    base = ["check-config", "conf/gateway.toml"]
    file_only = json.loads(_run_cli(*base).stdout)["gateway"]
    assert file_only["http_port"] == 8001 and file_only["shutdown_grace"] == 30.0  # file, default
    env = {"TUNNEL_GATEWAY_HTTP_PORT": "8100", "TUNNEL_GATEWAY_SHUTDOWN_GRACE": "5"}
    with_env = json.loads(_run_cli(*base, env=env).stdout)["gateway"]
    assert with_env["http_port"] == 8100 and with_env["shutdown_grace"] == 5.0
    with_flag = json.loads(_run_cli(*base, "--http-port", "8200", env=env).stdout)["gateway"]
    assert with_flag["http_port"] == 8200 and with_flag["shutdown_grace"] == 5.0
    bad_env = _run_cli(*base, env={"TUNNEL_GATEWAY_HTTP_PORT": "eighty"})
    assert bad_env.returncode == 2 and "TUNNEL_GATEWAY_HTTP_PORT" in bad_env.stderr


def test_help_lists_every_option_with_default():
    from gateway.client.config import CLIENT_SETTINGS
    from gateway.config import GATEWAY_SETTINGS

    gw = _run_cli("--help").stdout
    for s in GATEWAY_SETTINGS:
        assert s.option in gw and f"TUNNEL_GATEWAY_{s.name.upper()}" in re.sub(r"\s+", "", gw)
    cl = subprocess.run([sys.executable, "-m", "gateway.client.main", "--help"], cwd=ROOT, capture_output=True,
                        text=True, timeout=30).stdout
    for s in CLIENT_SETTINGS:
        assert s.option in cl and f"TUNNEL_CLIENT_{s.name.upper()}" in re.sub(r"\s+", "", cl)


def test_port_in_use_exits_3(procs, tmp_path):
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        out = _run_cli("-c", "conf/gateway.toml", "--workers", "1", "--http-port", str(port), "--tunnel-port", "0",
                       "--admin-port", "0")
        assert out.returncode == 3, out.stderr[-2000:]
    finally:
        blocker.close()


def test_grpc_io_engine_by_setting_on_both_ends(procs, tmp_path):
    """iomgr polling by default; EventEngine when asked; requests pass either way."""
    for n, (settings, extra, engine) in enumerate((({}, [], "iomgr"),
                                                   ({"grpc_event_engine": True}, ["--grpc-event-engine"], "event_engine"))):
        (tmp_path / str(n)).mkdir()
        stack = Stack(procs, tmp_path / str(n))
        stack.start_backend()
        stack.start_gateway(settings={"workers": 1, **settings})
        stack.start_client("c1", extra=extra)
        assert stack.status()["grpc_io"] == engine
        assert stack.client_status("c1")["grpc_io"] == engine
        for path in ("/hello", "/hello?again"):
            assert http("GET", f"{stack.url}{path}").status == 200
