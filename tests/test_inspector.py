"""The Inspector end to end (issue 19 part 2), with a real gateway (two workers),
client and backend: requests appear newest first with their fields, headers and
query secrets masked; filters and limit; a replay goes the same route again (the
backend sees it twice) and answers the new entry; 409 for a body not captured
whole; the admin token; an SSE stream still streams with the inspector on;
`inspect = false`; and `tunnel-client http` shows what it served on its status port."""
from __future__ import annotations

import asyncio
import json
import socket
import sys
import time

import pytest

from tests.harness import Stack, backend_stats, free_port, get_json, http, wait_until

SETTINGS = {"workers": 2, "inspect_body_bytes": 1024, "inspect_mask_headers": ["x-internal"]}


@pytest.fixture(scope="module")
def shared(make_module_stack) -> Stack:
    return make_module_stack(settings=SETTINGS)


def requests_of(stack: Stack, query: str = "") -> list[dict]:
    return get_json(f"{stack.admin_url}/admin/requests{query}")["requests"]


def test_requests_appear_newest_first_with_fields_masked(shared):
    s = shared
    first = http("GET", f"{s.url}/echo/first?api_key=SECRET&x=1", headers={
        "Authorization": "Bearer hunter2", "Cookie": "sid=abc", "X-Api-Key": "k1", "X-Internal": "private",
        "Accept": "text/plain"})
    assert first.status == 200
    second = http("POST", f"{s.url}/echo/second", body=b'{"hello": "world"}',
                  headers={"Content-Type": "application/json"})
    assert second.status == 200
    rows = requests_of(s, "?limit=200")
    ids = [r["id"] for r in rows]
    a, b = first.header("x-request-id"), second.header("x-request-id")
    assert ids.index(b) < ids.index(a)  # newest first (they may have been served by either worker)
    e = rows[ids.index(a)]
    for field in ("id", "time", "method", "host", "path", "query", "status", "duration", "request_headers",
                  "response_headers", "request_body", "response_body", "request_truncated", "response_truncated",
                  "group", "client_id", "error"):
        assert field in e, field
    assert (e["method"], e["path"], e["status"], e["group"], e["client_id"]) == ("GET", "/echo/first", 200, "g1", "c1")
    assert e["query"] == "api_key=***&x=1" and isinstance(e["duration"], float)
    shown = {k.lower(): v for k, v in e["request_headers"]}
    assert all(shown[h] == "***" for h in ("authorization", "cookie", "x-api-key", "x-internal")), shown
    assert shown["accept"] == "text/plain" and "hunter2" not in json.dumps([r["request_headers"] for r in rows])
    assert any(k.lower() == "x-request-id" and v == a for k, v in e["response_headers"])
    echoed = json.loads(e["response_body"])  # the backend's echo, captured: it saw the original headers
    assert ["Authorization", "Bearer hunter2"] in echoed["headers"] and e["response_truncated"] is False
    p = rows[ids.index(b)]
    assert p["request_body"] == '{"hello": "world"}' and p["request_truncated"] is False


def test_filters_and_limit(shared):
    s = shared
    for _ in range(3):
        assert http("GET", f"{s.url}/status/404").status == 404
    assert http("GET", f"{s.url}/status/503").status == 503
    assert [r["status"] for r in requests_of(s, "?status=404&limit=200")] == [404] * len(
        requests_of(s, "?status=404&limit=200"))
    assert len(requests_of(s, "?status=404")) >= 3
    assert {r["status"] for r in requests_of(s, "?status=5xx")} == {503}
    assert len(requests_of(s, "?limit=2")) == 2
    assert requests_of(s, "?group=nope") == [] and len(requests_of(s, "?group=g1")) >= 4
    bad = http("GET", f"{s.admin_url}/admin/requests?status=teapot")
    assert bad.status == 400 and bad.json()["error"] == "bad_request"
    assert http("GET", f"{s.admin_url}/admin/requests?limit=0").status == 400


def test_replay_goes_the_same_route_again(shared):
    s = shared
    before = backend_stats(s)["requests"]
    original = http("POST", f"{s.url}/echo/replay-me?token=T1", body=b"payload-123",
                    headers={"Authorization": "Bearer hunter2", "Content-Type": "text/plain"})
    assert original.status == 200
    rid = original.header("x-request-id")
    r = http("POST", f"{s.admin_url}/admin/requests/{rid}/replay")
    assert r.status == 200, r.body
    new = r.json()
    assert new["id"] != rid and new["replay_of"] == rid and new["status"] == 200
    assert (new["method"], new["path"], new["query"]) == ("POST", "/echo/replay-me", "token=***")
    echoed = json.loads(new["response_body"])
    assert echoed["query"] == "token=T1" and echoed["size"] == len(b"payload-123")  # the original, unmasked
    assert ["Authorization", "Bearer hunter2"] in echoed["headers"]
    assert any(k.lower() == "x-tunnel-replay" and v == rid for k, v in echoed["headers"])
    # The backend saw it twice (and the /stats request that reads its count).
    assert backend_stats(s)["requests"] - before == 3
    assert requests_of(s)[0]["id"] == new["id"]  # the newest entry
    missing = http("POST", f"{s.admin_url}/admin/requests/nope-0-1/replay")
    assert missing.status == 404 and missing.json()["error"] == "unknown_request"


def test_a_body_over_the_preview_is_not_replayed(shared):
    s = shared
    big = http("POST", f"{s.url}/echo/big", body=b"z" * 5000)
    assert big.status == 200
    rid = big.header("x-request-id")
    e = next(r for r in requests_of(s, "?limit=200") if r["id"] == rid)
    assert e["request_truncated"] is True and len(e["request_body"]) == 1024 and e["request_size"] == 5000
    r = http("POST", f"{s.admin_url}/admin/requests/{rid}/replay")
    assert r.status == 409 and r.json()["error"] == "body_not_captured", r.body
    assert "5000 bytes" in r.json()["message"]


def test_sse_still_streams_with_the_inspector_on(shared):
    s = shared
    with socket.create_connection(("127.0.0.1", s.http_port), timeout=10) as sock:
        sock.sendall(b"GET /sse?n=6&ms=300 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        t0 = time.monotonic()
        got = b""
        while b"data:" not in got:
            got += sock.recv(4096)
        first = time.monotonic() - t0
        while chunk := sock.recv(4096):
            got += chunk
        total = time.monotonic() - t0
    assert first < 1.0 and total > 1.4, (first, total)  # the first event long before the stream's end
    e = next(r for r in requests_of(s) if r["path"] == "/sse")
    assert e["done"] and e["status"] == 200 and e["response_body"].count("data:") == 6


def test_an_exposed_admin_port_asks_for_the_token(procs, tmp_path):
    from tests.test_admin_auth import TOKEN_VALUE, _exposed_gateway

    s = _exposed_gateway(procs, tmp_path)  # every port on 0.0.0.0, admin_token set (required there)
    s.start_client(wait=False)
    wait_until(lambda: http("GET", f"{s.url}/hello").status == 200, 15, what="a routable client")
    rid = http("GET", f"{s.url}/hello").header("x-request-id")
    for method, path in (("GET", "/admin/requests"), ("GET", "/inspector"), ("GET", f"/inspector/{rid}"),
                         ("POST", f"/admin/requests/{rid}/replay"), ("POST", f"/inspector/{rid}/replay")):
        assert http(method, f"{s.admin_url}{path}").status == 401, path
        assert http(method, f"{s.admin_url}{path}", headers={"Authorization": "Bearer wrong"}).status == 401, path
    auth = {"Authorization": f"Bearer {TOKEN_VALUE}"}
    rows = http("GET", f"{s.admin_url}/admin/requests", headers=auth).json()["requests"]
    assert rows[0]["id"] == rid and rows[0]["path"] == "/hello"
    # The replay reaches the entry listening on 0.0.0.0 through loopback.
    again = http("POST", f"{s.admin_url}/admin/requests/{rid}/replay", headers=auth)
    assert again.status == 200 and again.json()["replay_of"] == rid, again.body


def test_inspect_false_keeps_nothing(make_stack):
    s = make_stack(settings={"inspect": False, "workers": 1})
    assert http("GET", f"{s.url}/hello").status == 200
    assert requests_of(s) == []


def test_tunnel_client_http_shows_what_it_served(procs, tmp_path):
    from tests.test_quick import TOKEN, Quick

    quick = Quick(procs, tmp_path, ["--token", TOKEN])
    admin = free_port()
    args = [sys.executable, "-m", "gateway.client.main", "http", str(quick.stack.backend_port), "--server",
            f"127.0.0.1:{quick.tunnel_port}", "--token", TOKEN, "--name", "insp", "--admin-port", str(admin)]
    client = procs.start("quick-insp", args)
    wait_until(lambda: "Forwarding http://" in client.output(), 15, what="the Forwarding line", watch=client)
    r = quick.get("insp.localhost", "/echo/local?password=pw")
    assert r.status == 200
    rid = r.header("x-request-id")
    rows = get_json(f"http://127.0.0.1:{admin}/api/requests")["requests"]
    assert rows and rows[0]["id"] == rid  # the gateway's request id, on the client too
    e = rows[0]
    assert (e["method"], e["path"], e["query"], e["status"]) == ("GET", "/echo/local", "password=***", 200)
    assert e["client_id"] and json.loads(e["response_body"])["path"] == "/echo/local"
    # The heads are kept encoded and decoded when shown.
    sent = {k.lower(): v for k, v in e["request_headers"]}
    answered = {k.lower(): v for k, v in e["response_headers"]}
    assert sent["host"].startswith("insp.localhost") and answered["content-type"].startswith("application/json")
    page = http("GET", f"http://127.0.0.1:{admin}/")
    assert page.status == 200 and "/echo/local" in page.body.decode()
    again = http("POST", f"http://127.0.0.1:{admin}/api/requests/{rid}/replay")
    assert again.status == 200 and again.json()["replay_of"] == rid and again.json()["status"] == 200
    echoed = json.loads(again.json()["response_body"])
    assert echoed["query"] == "password=pw"
    assert get_json(f"http://127.0.0.1:{admin}/api/requests")["requests"][0]["id"] == again.json()["id"]


def test_the_client_notes_bodies_errors_and_websockets(procs, tmp_path):
    """What the client's capture notes as its exchange goes (no wrapper around it): a POST's
    body both ways, an upstream that is gone as an error, a WebSocket's handshake only."""
    import aiohttp

    from tests.test_quick import TOKEN, Quick

    quick = Quick(procs, tmp_path, ["--token", TOKEN])

    def client(name: str, port: int) -> str:
        admin = free_port()
        proc = procs.start(f"quick-{name}", [
            sys.executable, "-m", "gateway.client.main", "http", str(port), "--server", f"127.0.0.1:{quick.tunnel_port}",
            "--token", TOKEN, "--name", name, "--admin-port", str(admin)])
        wait_until(lambda: "Forwarding http://" in proc.output(), 15, what="the Forwarding line", watch=proc)
        return f"http://127.0.0.1:{admin}/api/requests"

    api = client("notes", quick.stack.backend_port)
    r = http("POST", f"http://127.0.0.1:{quick.http_port}/echo/post", body=b"a body to note",
             headers={"Host": "notes.localhost", "Content-Type": "text/plain"})
    assert r.status == 200
    e = get_json(api)["requests"][0]
    assert (e["id"], e["method"], e["status"], e["error"]) == (r.header("x-request-id"), "POST", 200, "")
    assert e["request_body"] == "a body to note" and json.loads(e["response_body"])["size"] == 14

    async def websocket() -> str:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{quick.http_port}/ws",
                                          headers={"Host": "notes.localhost"}) as ws:
                await ws.send_str("not noted")
                return (await ws.receive(timeout=10)).data

    assert asyncio.run(websocket()) == "not noted"
    wait_until(lambda: get_json(api)["requests"][0]["path"] == "/ws", 10, what="the WebSocket's entry")
    e = get_json(api)["requests"][0]
    assert e["status"] == 101 and e["request_body"] == "" and e["response_body"] == "", e

    gone = client("gone", free_port())
    r = http("GET", f"http://127.0.0.1:{quick.http_port}/hello", headers={"Host": "gone.localhost"})
    assert r.status == 502
    e = get_json(gone)["requests"][0]
    assert (e["status"], e["error"]) == (0, "upstream_unavailable"), e
