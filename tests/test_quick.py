"""A tunnel in one line (issue 19 part 1), with real processes: `tunnel-gateway --quick`
runs with no config file and prints its token and the client command; `tunnel-client
http PORT --name demo` gets `http://demo.localhost:PORT` and prints it, then one line a
request; requests for that host reach the local port; the route goes when the client
goes. Bad tokens, taken names and configured hosts are refused with exit status 2 and
a clear message; a random name when none is given. Every process is stopped after
each test, also when it fails."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys

import pytest

from gateway.tunnel import frames
from tests.harness import Stack, children_of, free_port, get_json, http, proc_title, raw_request, wait_until
from tests.test_bad_input import RawTunnel

TOKEN = "quick-test-token"


class Quick:
    """A `--quick` gateway and the backend quick clients expose."""

    def __init__(self, procs, tmp_path, extra: list[str] | None = None) -> None:
        self.procs = procs
        self.stack = Stack(procs, tmp_path)
        self.stack.start_backend()
        self.http_port, self.tunnel_port, self.admin_port = free_port(), free_port(), free_port()
        self.gateway = procs.start("gateway", [
            sys.executable, "-m", "gateway.cli", "--quick", "--host", "127.0.0.1", "--workers", "2",
            "--http-port", str(self.http_port), "--tunnel-port", str(self.tunnel_port), "--grpc-port", "0",
            "--admin-port", str(self.admin_port), *(extra or [])])
        wait_until(lambda: http("GET", f"http://127.0.0.1:{self.admin_port}/healthz", timeout=2).status == 200,
                   what="quick gateway", watch=self.gateway)

    def client(self, name: str = "demo", token: str = TOKEN, *extra: str, wait: bool = True):
        args = [sys.executable, "-m", "gateway.client.main", "http", str(self.stack.backend_port),
                "--server", f"127.0.0.1:{self.tunnel_port}", "--token", token, *extra]
        if name:
            args += ["--name", name]
        proc = self.procs.start(f"quick-{name or 'random'}", args)
        if wait:
            wait_until(lambda: "Forwarding http://" in proc.output(), 15, what="the Forwarding line", watch=proc)
        return proc

    def get(self, host: str, path: str = "/hello"):
        return raw_request(self.http_port, "GET", path, headers=[("Host", f"{host}:{self.http_port}")], timeout=10)


@pytest.fixture
def quick(procs, tmp_path) -> Quick:
    return Quick(procs, tmp_path, ["--token", TOKEN])


def test_one_line_tunnel(quick):
    assert f"tunnel-client http 3000 --server 127.0.0.1:{quick.tunnel_port} --token={TOKEN}" in quick.gateway.output()
    client = quick.client("demo")
    url = f"http://demo.localhost:{quick.http_port}"
    assert f"Forwarding {url} -> http://127.0.0.1:{quick.stack.backend_port}" in client.output()
    assert re.search(r"Inspector +http://127\.0\.0\.1:40\d\d", client.output()), client.output()
    for _ in range(3):
        r = quick.get("demo.localhost")
        assert r.status == 200 and len(r.body) == 100, r.body[:300]
    # One console line a request: time, method, path, status, duration.
    wait_until(lambda: len(re.findall(r"\d\d:\d\d:\d\d GET +/hello +200 +[\d.]+ ms", client.output())) >= 3, 5,
               what="three console lines")
    # Other hosts are not this tunnel's.
    assert quick.get("other.localhost").status == 404 and quick.get("127.0.0.1").status == 404
    # The route goes when the client goes.
    client.stop()
    wait_until(lambda: quick.get("demo.localhost").status == 404, 10, what="the route gone")


def test_names_taken_bad_and_random(quick):
    first = quick.client("demo", TOKEN, "--client-id", "victim")
    second = quick.client("demo", wait=False)
    wait_until(lambda: not second.alive(), 15, what="the second demo to exit")
    assert second.popen.returncode == 2 and "in use" in second.output(), second.output()
    # The same client id does not make another process the name's holder (ids are claimed, not proven).
    thief = quick.client("demo", TOKEN, "--client-id", "victim", wait=False)
    wait_until(lambda: not thief.alive(), 15, what="the thief to exit")
    assert thief.popen.returncode == 2 and "in use" in thief.output(), thief.output()
    assert first.alive() and quick.get("demo.localhost").status == 200
    random = quick.client("", wait=True)
    name = re.search(r"Forwarding http://([a-z0-9]{10})\.localhost:", random.output()).group(1)
    assert quick.get(f"{name}.localhost").status == 200
    bad = quick.procs.start("bad-name", [sys.executable, "-m", "gateway.client.main", "http", "3000",
                                         "--server", f"127.0.0.1:{quick.tunnel_port}", "--token", TOKEN,
                                         "--name", "Not_A_Label"])
    wait_until(lambda: not bad.alive(), 10, what="a bad name refused at start")
    assert bad.popen.returncode == 2 and "one DNS label" in bad.output()


def _router_of(quick: Quick) -> int:
    """The router's pid, once both workers are linked to it (a worker without the router
    routes only to its own streams, and tells its clients at once)."""
    wait_until(lambda: quick.gateway.output().count('"msg":"router connected"') >= 2, 10,
               what="both workers linked to the router", watch=quick.gateway)
    return next(p for p in children_of(quick.gateway.popen.pid) if "tunnel-gateway: router" in proc_title(p))


async def _quick_hello(quick: Quick, tunnel: RawTunnel, client_id: str, name: str) -> None:
    await tunnel.send_frames(frames.hello(
        client_id=client_id, group="quick", token=TOKEN, version="test", capabilities=["http"], connection_index=0,
        instance=f"{client_id}-1", quick_name=name, quick_upstream=f"http://127.0.0.1:{quick.stack.backend_port}"))


def test_the_url_works_on_every_worker_once_told(quick):
    """WELCOME's URL is what a person opens at once: it comes after every worker can route it.
    The router is held still (SIGSTOP) while a raw tunnel connection says HELLO and let go
    0.3 s later; the moment WELCOME arrives, requests on fresh connections (landing on both
    workers) go out: each reaches the one stream, none gets the 404 of a name a worker has
    not heard of yet."""
    router = _router_of(quick)

    async def main() -> tuple[list[bytes], int]:
        tunnel = RawTunnel(quick.tunnel_port)
        os.kill(router, signal.SIGSTOP)
        try:
            await _quick_hello(quick, tunnel, "racer", "race")
            asyncio.get_running_loop().call_later(0.3, os.kill, router, signal.SIGCONT)
            first = await tunnel.read()
            assert first and first[0].welcome.accepted, first
            assert first[0].welcome.public_url == f"http://race.localhost:{quick.http_port}"
            callers = [await asyncio.open_connection("127.0.0.1", quick.http_port) for _ in range(16)]
            for _, writer in callers:
                writer.write(f"GET /hello HTTP/1.1\r\nHost: race.localhost:{quick.http_port}\r\n\r\n".encode())
            heads, answered = 0, []
            for reader, writer in callers:
                # The gateway's own answers (a 404) come at once; the routed ones wait for the tunnel.
                with contextlib.suppress(asyncio.TimeoutError):
                    answered.append(await asyncio.wait_for(reader.read(200), 0.05))
            while heads < len(callers) - len(answered):
                batch = await tunnel.read(timeout=10)
                assert batch is not None, "the gateway ended the tunnel"
                heads += sum(1 for f in batch if f.WhichOneof("kind") == "headers" and not f.reply)
            for _, writer in callers:
                writer.close()
            return answered, heads
        finally:
            os.kill(router, signal.SIGCONT)
            await tunnel.close()

    answered, heads = asyncio.run(asyncio.wait_for(main(), 30))
    assert heads == 16 and not answered, answered


def test_a_client_gone_before_its_welcome_leaves_its_name_free(quick):
    """A quick client that hangs up while its WELCOME waits for the other workers (the router
    held still) leaves no stream behind: its name is free for the next one."""
    router = _router_of(quick)

    async def gone() -> None:
        tunnel = RawTunnel(quick.tunnel_port)
        os.kill(router, signal.SIGSTOP)
        try:
            await _quick_hello(quick, tunnel, "leaver", "demo")
            # Registered, its WELCOME waiting (a worker's own status shows it; polled, as either may answer).
            await asyncio.to_thread(wait_until, lambda: any(
                s["client_id"] == "leaver" for s in get_json(f"http://127.0.0.1:{quick.admin_port}/admin/status")[
                    "streams"]), 10, what="the HELLO's stream registered", watch=quick.gateway)
            await tunnel.close()
            await asyncio.sleep(0.2)
        finally:
            os.kill(router, signal.SIGCONT)

    asyncio.run(asyncio.wait_for(gone(), 30))
    # The stream ends saying so (its log line comes just before it leaves the registry)...
    wait_until(lambda: '"reason":"welcome_failed"' in quick.gateway.output(), 10, what="the stream ended",
               watch=quick.gateway)
    # ...and no worker's status shows it (each answers for itself and from the router's table).
    for _ in range(4):
        wait_until(lambda: not get_json(f"http://127.0.0.1:{quick.admin_port}/admin/status")["streams"], 10,
                   what="no stream left", watch=quick.gateway)
    client = quick.client("demo")
    assert quick.get("demo.localhost").status == 200, client.output()


def test_a_wrong_token_exits_2(quick):
    client = quick.client("demo", "wrong-token", wait=False)
    wait_until(lambda: not client.alive(), 15, what="the client to exit")
    assert client.popen.returncode == 2 and "bad_credentials" in client.output(), client.output()


def test_generated_token_and_domain(procs, tmp_path):
    q = Quick(procs, tmp_path, ["--domain", "tunnel.example.com"])
    out = q.gateway.output()
    token = re.search(r"--token=([0-9a-f]{32})", out).group(1)
    client = q.client("app", token)
    assert "Forwarding http://app.tunnel.example.com -> " in client.output()
    assert q.get("app.tunnel.example.com").status == 200


def test_configured_routes_win(make_stack):
    """A configured gateway allows quick tunnels with [quick]; a name whose host a configured
    route takes is refused, and other names work beside the configured routes."""

    def edit(stack: Stack, doc: dict) -> None:
        doc["quick"] = {"tokens": [TOKEN]}
        # A route for part of a host takes the whole host from quick tunnels.
        doc["routes"] = [{"host": "app.localhost", "path_prefix": "/v1", "methods": ["GET"], "group": "g1"}]

    stack = make_stack(edit=edit, client=None)
    base = [sys.executable, "-m", "gateway.client.main", "http", str(stack.backend_port),
            "--server", f"127.0.0.1:{stack.tunnel_port}", "--token", TOKEN]
    taken = stack.procs.start("quick-app", [*base, "--name", "app"])
    wait_until(lambda: not taken.alive(), 15, what="the name of a configured host refused")
    assert taken.popen.returncode == 2 and "configured route" in taken.output(), taken.output()
    local = free_port()
    free = stack.procs.start("quick-free", [*base, "--name", "free", "--local-port", str(local)])
    wait_until(lambda: "Forwarding http://free.localhost" in free.output(), 15, what="free connected", watch=free)
    r = raw_request(stack.http_port, "GET", "/hello", headers=[("Host", "free.localhost")])
    assert r.status == 200
    groups = get_json(f"{stack.admin_url}/admin/status")["groups"]
    assert groups.get("quick.free") == 2, groups
    # A quick token opens no way to the gateway's backends: its egress is refused.
    r = http("GET", f"http://127.0.0.1:{local}/hello")
    assert r.status == 404 and r.json()["error"] == "no_matching_rule", r.body[:300]
    # Metrics name every quick tunnel "quick": names come and go, series would not.
    metrics = http("GET", f"{stack.admin_url}/metrics").body.decode()
    assert 'group="quick"' in metrics and "quick.free" not in metrics


def test_a_name_is_one_tunnel_fleet_wide(redis_server, make_stack):
    """In a fleet a quick name is taken on every node: a second `demo` on node B is refused
    while the first holds it on node A, and requests for demo entering B reach A's client."""
    from tests.test_fleet import A, B, node_settings, sees_client

    def edit(_stack: Stack, doc: dict) -> None:
        doc["quick"] = {"tokens": [TOKEN]}
        doc["routes"] = []

    peer_port = free_port()
    a = make_stack(host=A, name="gateway-a", settings=node_settings(redis_server.url, "a", peer_port), edit=edit,
                   client=None)
    b = make_stack(host=B, name="gateway-b", like=a, settings=node_settings(redis_server.url, "b", peer_port),
                   edit=edit, client=None)

    def quick_client(stack: Stack, label: str):
        return stack.procs.start(label, [sys.executable, "-m", "gateway.client.main", "http", str(a.backend_port),
                                         "--server", f"{stack.host}:{stack.tunnel_port}", "--token", TOKEN,
                                         "--name", "demo", "--no-learn-fleet"])

    first = quick_client(a, "quick-demo-a")
    wait_until(lambda: "Forwarding http://demo.localhost" in first.output(), 15, what="demo on a", watch=first)
    wait_until(lambda: sees_client(b, {"quick.demo": 2}), 15, what="b sees demo on a")
    r = http("GET", f"{b.url}/hello", headers={"Host": f"demo.localhost:{b.http_port}"})
    assert r.status == 200, r.body[:300]
    second = quick_client(b, "quick-demo-b")
    wait_until(lambda: not second.alive(), 15, what="the second demo refused on b")
    assert second.popen.returncode == 2 and "in use" in second.output(), second.output()
