"""Routes match the normalised request target, and that target is what the
upstream gets (issue 17, item 5): absolute form, dot segments (encoded ones
too), encoded slashes, fragments, TRACE."""
from __future__ import annotations

import asyncio
import json

import pytest

from gateway.tunnel import frames
from tests.harness import TOKEN, Stack, header_values, raw_request
from tests.test_bad_input import RawTunnel

ROUTES = [
    {"name": "trace", "path_prefix": "/echo/trace", "methods": ["TRACE"], "group": "g1"},
    {"name": "other", "path_prefix": "/echo/other", "group": "other"},
    {"name": "default", "path_prefix": "/", "group": "g1"},
]


@pytest.fixture(scope="module")
def stack(make_module_stack) -> Stack:
    def edit(stack: Stack, doc: dict) -> None:
        # Each group's client marks what it forwards, so the echo tells which group got it.
        for name in ("g1", "other", "raw"):
            doc["groups"][name] = {
                "tokens": [TOKEN],
                "upstreams": {"web": {"servers": [stack.backend_url]}},
                "rules": [{"path_prefix": "/", "upstream": "web", "add_headers": {"x-via-group": name}}],
            }

    stack = make_module_stack(settings={"workers": 1}, routes=ROUTES, edit=edit)
    stack.start_client("c2", group="other")
    return stack


def _routed(stack: Stack, target: str, host: str = "", method: str = "GET") -> tuple[str, str]:
    """(the group that got the request, the path and query its upstream saw)."""
    headers = [("Host", host)] if host else None
    r = raw_request(stack.http_port, method, target, headers)
    assert r.status == 200, (target, r.status, r.body[:300])
    echo = json.loads(r.body)
    return header_values(echo["headers"], "x-via-group")[0], echo["raw_path"]


@pytest.mark.parametrize("target,group,seen", [
    ("/echo/other/x", "other", "/echo/other/x"),
    ("/echo/x", "g1", "/echo/x"),
    ("/echo/other/../x", "g1", "/echo/x"),                  # names /echo/x, not a path under /echo/other
    ("/echo/other/%2e%2e/x?q=1", "g1", "/echo/x?q=1"),
    ("/echo/other/.%2E/x", "g1", "/echo/x"),
    ("/echo/a/%2e%2e/other/y", "other", "/echo/other/y"),   # names a path under /echo/other
    ("/%2e%2e/echo/other/z", "other", "/echo/other/z"),
    ("/echo/./other/./w", "other", "/echo/other/w"),
    ("/echo/other%2Fx", "g1", "/echo/other%2Fx"),           # an encoded slash is no separator
    ("/echo/other/..%2Fx", "other", "/echo/other/..%2Fx"),
])
def test_routes_match_what_is_forwarded(stack, target, group, seen):
    assert _routed(stack, target) == (group, seen)


def test_absolute_form_names_the_host_and_path(stack):
    target = f"http://127.0.0.1:{stack.http_port}/echo/other/x"
    assert _routed(stack, target, host="elsewhere.example") == ("other", "/echo/other/x")
    assert _routed(stack, f"http://127.0.0.1:{stack.http_port}/echo/other/../x") == ("g1", "/echo/x")


def test_absolute_form_host_goes_to_host_rules(stack):
    """The host rules see the target's authority, and so does the upstream (as Host)."""
    r = raw_request(stack.http_port, "GET", "http://Named.Example/echo/h", [("Host", "caller.example")])
    assert r.status == 200, r.body[:300]
    assert header_values(json.loads(r.body)["headers"], "Host") == ["named.example"]


@pytest.mark.parametrize("target", ["/echo#frag", "/echo/x?q=1#frag", "/echo/%zz", "/echo/a%2"])
def test_bad_target_400(stack, target):
    r = raw_request(stack.http_port, "GET", target)
    assert r.status == 400, (target, r.status, r.body[:300])
    assert json.loads(r.body)["error"] == "bad_target"


def test_asterisk_form_400(stack):
    assert raw_request(stack.http_port, "GET", "*").status == 400  # aiohttp's parser or ours: never routed


def test_trace_405_unless_a_route_allows_it(stack):
    r = raw_request(stack.http_port, "TRACE", "/echo/x")
    assert r.status == 405 and json.loads(r.body)["error"] == "method_not_allowed", (r.status, r.body[:300])
    r = raw_request(stack.http_port, "TRACE", "/echo/other/../trace/../x")
    assert r.status == 405, r.body[:300]
    assert _routed(stack, "/echo/trace/x", method="TRACE") == ("g1", "/echo/trace/x")


@pytest.mark.parametrize("target,seen,host", [
    ("/echo/a/%2e%2e/b?x=1", "/echo/b?x=1", None),
    ("/echo/a%2Fb/../c", "/echo/c", None),
    ("http://Proxied.Example/echo/p/./q", "/echo/p/q", "proxied.example"),  # the local entry as an HTTP proxy
])
def test_egress_forwards_the_normalised_target(stack, target, seen, host):
    r = raw_request(stack.clients["c1"][1], "GET", target, [("Host", "caller.example")])
    assert r.status == 200, (r.status, r.body[:300])
    echo = json.loads(r.body)
    assert echo["raw_path"] == seen
    if host:
        assert header_values(echo["headers"], "Host") == [host]


def test_egress_fragment_400(stack):
    r = raw_request(stack.clients["c1"][1], "GET", "/echo#x")
    assert r.status == 400 and json.loads(r.body)["error"] == "bad_target", (r.status, r.body[:300])


def _last(f) -> bool:
    """The last frame of an answer: a RESET, or a head or DATA that ends the stream."""
    kind = f.WhichOneof("kind")
    return kind == "reset" or (kind == "headers" and f.headers.end_stream) or (kind == "data" and f.data.end_stream)


def test_gateway_normalises_what_an_untrusted_client_sends(stack):
    """A hand-made client's egress heads: the gateway's forward rules match the normalised
    target and the backend gets it; a fragment is RESET with bad_target."""

    async def exchange(t: RawTunnel, rid: str, path: str, host: str = "127.0.0.1") -> list:
        await t.send_frames(frames.request_head(
            rid, "trace-" + rid, method="GET", path=path, scheme="http", authority="127.0.0.1",
            headers=[("Host", host)], end_stream=True, timeout_ms=5000, fields=True))
        got: list = []
        while not any(_last(f) for f in got):
            batch = await t.read()
            assert batch is not None, got
            got += [f for f in batch if f.request_id == rid]
        return got

    async def main() -> dict:
        t = RawTunnel(stack.tunnel_port)
        try:
            await t.hello("raw-client", group="raw", token=TOKEN, capabilities=("http", frames.HEADER_FIELDS))
            return {
                "dots": await exchange(t, "e1", "/echo/a/%2e%2e/b"),
                "absolute": await exchange(t, "e2", "http://Abs.Example/echo/./c", host="caller.example"),
                "fragment": await exchange(t, "e3", "/echo#x"),
            }
        finally:
            await t.close()

    out = asyncio.run(main())

    def body_of(got: list) -> dict:
        return json.loads(b"".join(f.data.data for f in got if f.WhichOneof("kind") == "data"))

    assert body_of(out["dots"])["raw_path"] == "/echo/b"
    absolute = body_of(out["absolute"])
    assert absolute["raw_path"] == "/echo/c" and header_values(absolute["headers"], "Host") == ["abs.example"]
    resets = [f for f in out["fragment"] if f.WhichOneof("kind") == "reset"]
    assert resets and resets[0].reset.code == "bad_target", out["fragment"]
