"""The first hour with a running gateway (issue 19, part 4), real processes: the
start-up line's URLs; the access log's remote address, user agent and masked
credentials; egress requests in the gateway's access log and metrics; a drain
naming nobody answers 404; a refused client exits 2 at once (or keeps trying
with --retry-on-reject); a reload that asks for a restart names every key at
warning level; a SIGTERM'd gateway logs no warning; a client reconnecting says
so once a back-off step, not once a connection; `make demo` names the process
holding its port."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.harness import ROOT, free_port, http, to_toml, wait_until

sys.path.insert(0, str(ROOT / "scripts"))
import demo  # noqa: E402  (scripts/demo.py)


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def _access(stack, direction: str) -> list[dict]:
    return [r for r in _json_lines(stack.gateway.output()) if r.get("direction") == direction]


def test_a_running_gateway_tells_and_logs_what_a_newcomer_needs(make_stack):
    stack = make_stack(settings={"workers": 1})
    # Start-up: where to reach each port, as URLs.
    assert f"http http://127.0.0.1:{stack.http_port}" in stack.gateway.output()
    assert f"admin http://127.0.0.1:{stack.admin_port}/" in stack.gateway.output()

    # The access log: the caller's address and user agent; credentials in the query masked.
    r = http("GET", f"{stack.url}/hello?api_key=abc123&q=1&Access_Token=zz9&signature=s1",
             headers={"User-Agent": "first-hour/1.0"})
    assert r.status == 200
    wait_until(lambda: any(a["path"].startswith("/hello?") for a in _access(stack, "ingress")), 10,
               what="the ingress access line")
    line = next(a for a in _access(stack, "ingress") if a["path"].startswith("/hello?"))
    assert line["path"] == "/hello?api_key=***&q=1&Access_Token=***&signature=***", line
    assert line["remote"] == "127.0.0.1" and line["user_agent"] == "first-hour/1.0" and line["retried"] is False
    assert "abc123" not in stack.gateway.output() and "zz9" not in stack.gateway.output()

    # Egress: the client's local entry -> tunnel -> the gateway's forward rule; the gateway logs and counts it.
    assert http("GET", f"{stack.local_url()}/hello?token=t0k").status == 200
    wait_until(lambda: _access(stack, "egress"), 10, what="the gateway's egress access line")
    egress = _access(stack, "egress")[0]
    assert egress["path"] == "/hello?token=***" and egress["status"] == 200, egress
    assert egress["client_id"] == "c1" and egress["group"] == "g1" and egress["bytes_out"] > 0
    assert egress["remote"] == "127.0.0.1"  # the client's address
    metrics = http("GET", f"{stack.admin_url}/metrics").body.decode()
    assert any(m.startswith("tunnel_requests_total{") and 'direction="egress"' in m
               for m in metrics.splitlines()), metrics[:2000]

    # A drain naming a worker or a client that does not exist: 404 with a message.
    def drain(body: dict):
        return http("POST", f"{stack.admin_url}/admin/drain", json.dumps(body).encode(),
                    {"Content-Type": "application/json"})

    for body, code in (({"worker": 7}, "unknown_worker"), ({"client_id": "nobody"}, "unknown_client"),
                       ({"client_id": "c1", "group": "g9"}, "unknown_client")):
        r = drain(body)
        assert r.status == 404 and r.json()["error"] == code and r.json()["message"], (body, r.body)
    ok = drain({"client_id": "c1", "limit": 0})
    assert ok.status == 200 and ok.json()["drained"] == 0

    # Refused credentials: exit 2 at the first refusal, saying why.
    bad = stack.start_client("bad", token="wrong-token", wait=False)
    wait_until(lambda: not bad.alive(), 20, what="the refused client to exit")
    assert bad.popen.returncode == 2, bad.output()
    assert "the gateway refused this client: bad_credentials" in bad.output()
    assert not any(r.get("msg") == "reconnecting" for r in _json_lines(bad.output()))
    # --retry-on-reject keeps it trying.
    patient = stack.start_client("patient", token="wrong-token", wait=False, extra=["--retry-on-reject"])
    wait_until(lambda: any(r.get("msg") == "reconnecting" and r.get("after") == "rejected"
                           for r in _json_lines(patient.output())), 20, what="the patient client to retry")
    assert patient.alive()
    patient.stop(10)

    # A reload that changes settings taking a restart: refused, at warning level, naming each one.
    doc = stack.gateway_doc(settings={"workers": 1})
    running = stack.gateway_config.read_text()
    doc["gateway"]["http_port"] = free_port()
    doc["gateway"]["admin_port"] = free_port()
    stack.gateway_config.write_text(to_toml(doc))
    stack.gateway.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: any(r.get("msg", "").startswith("config reload rejected")
                           for r in _json_lines(stack.gateway.output())), 10, what="the rejection")
    rejected = next(r for r in _json_lines(stack.gateway.output())
                    if r.get("msg", "").startswith("config reload rejected"))
    assert rejected["level"] == "warning", rejected
    assert rejected["keys"] == ["gateway.http_port", "gateway.admin_port"], rejected
    assert "http_port: takes a restart" in rejected["msg"] and "admin_port: takes a restart" in rejected["msg"]
    stack.gateway_config.write_text(running)
    assert http("GET", f"{stack.url}/hello").status == 200

    # A normal shutdown: no warning from the gateway; the client says "reconnecting" once a step.
    gateway_mark, client_mark = len(stack.gateway.output()), len(stack.clients["c1"][0].output())
    stack.gateway.popen.send_signal(signal.SIGTERM)
    assert stack.gateway.popen.wait(30) == 0
    shutdown = _json_lines(stack.gateway.output()[gateway_mark:])
    assert shutdown and not [r for r in shutdown if r.get("level") in ("warning", "error")], shutdown
    client = stack.clients["c1"][0]
    wait_until(lambda: len([r for r in _json_lines(client.output()[client_mark:])
                            if r.get("msg") == "reconnecting"]) >= 4, 30, what="four reconnect steps")
    steps = [r["step"] for r in _json_lines(client.output()[client_mark:]) if r.get("msg") == "reconnecting"]
    assert len(steps) == len(set(steps)), steps  # two connections, one line a step
    failures = [r for r in _json_lines(client.output()[client_mark:]) if r.get("msg", "").startswith("cannot reach")]
    assert len([r for r in failures if r["level"] == "warning"]) <= 2, failures  # then at debug while it repeats


def _hold_port(port: int) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import socket, sys, time\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('127.0.0.1', {port})); s.listen(); print('ready', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ready"
    return holder


def test_busy_ports_names_the_process_holding_one():
    port = free_port()
    holder = _hold_port(port)
    try:
        busy = demo.busy_ports({port: "a test port", free_port(): "a free one"})
        assert len(busy) == 1, busy
        assert f"port {port} (a test port) is in use by pid {holder.pid} (" in busy[0] and "python" in busy[0]
    finally:
        holder.kill()
        holder.wait()


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_refuses_to_start_on_a_taken_port():
    if any(_busy(p) for p in demo.DEMO_PORTS):
        pytest.skip("the demo's fixed ports are in use here")
    holder = _hold_port(7002)  # the client's status port: test_demo.py skips while it is taken
    try:
        started = time.monotonic()
        out = subprocess.run([sys.executable, "scripts/demo.py"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 2, out.stdout + out.stderr
        assert f"port 7002 (the client's status port) is in use by pid {holder.pid}" in out.stderr
        assert "nothing was started" in out.stderr and time.monotonic() - started < 10
        assert not any(_busy(p) for p in demo.DEMO_PORTS if p != 7002)  # it started nothing
    finally:
        holder.kill()
        holder.wait()


def test_demo_banner_names_the_status_page():
    text = (ROOT / "scripts" / "demo.py").read_text()
    assert "http://127.0.0.1:9090/\\n" in text and "status page" in text


def test_a_sigterm_of_two_workers_logs_no_warning(make_stack):
    """With more than one worker too: each says it stops before it does, so the router and
    the other worker take its silence for a stop (info), not a loss (warning)."""
    stack = make_stack(settings={"workers": 2})
    assert http("GET", f"{stack.url}/hello").status == 200
    mark = len(stack.gateway.output())
    stack.gateway.popen.send_signal(signal.SIGTERM)
    assert stack.gateway.popen.wait(30) == 0
    lines = _json_lines(stack.gateway.output()[mark:])
    assert lines and not [r for r in lines if r.get("level") in ("warning", "error")], lines
