"""The Inspector's capture, pure (gateway/inspection.py): the ring, body previews kept
by reference and cut at the limit, masking of headers and query, filters, what a
replay takes, and the pages' body views (gateway/inspect_page.py)."""
from __future__ import annotations

import base64

import pytest

from gateway.inspection import Capture, Inspector, NotReplayable, header_names, status_filter
from gateway.inspect_page import body_view, render_detail, render_list
from gateway.observe import AccessRecord


def _rec(rid: str, path: str = "/x", group: str = "g1", status: int = 200, error: str = "") -> AccessRecord:
    rec = AccessRecord(request_id=rid, trace_id="t", method="POST", host="h.example", path=path, worker="0",
                       direction="ingress")
    rec.group, rec.status, rec.error = group, status, error
    return rec


RAW = ((b"Host", b"h.example"), (b"Authorization", b"Bearer s3cret"), (b"Cookie", b"sid=1"),
       (b"X-Api-Key", b"k"), (b"Proxy-Authorization", b"Basic x"), (b"X-Internal", b"hidden"),
       (b"Content-Type", b"application/json"), (b"Content-Length", b"9"), (b"Accept", b"*/*"))


def test_ring_keeps_the_last_n_newest_first_and_filters():
    insp = Inspector(size=3, body_bytes=16)
    for i, (group, status) in enumerate([("g1", 200), ("g2", 404), ("g1", 502), ("g2", 200)]):
        cap = insp.open(_rec(f"r{i}", group=group, status=status, error="bad" if status == 502 else ""), ())
        cap.finish()
    assert [e["id"] for e in insp.entries()] == ["r3", "r2", "r1"]  # r0 fell out of the ring
    assert [e["id"] for e in insp.entries(limit=2)] == ["r3", "r2"]
    assert [e["id"] for e in insp.entries(group="g2")] == ["r3", "r1"]
    assert [e["id"] for e in insp.entries(status="4xx")] == ["r1"]
    assert [e["id"] for e in insp.entries(status="502")] == ["r2"]
    assert [e["id"] for e in insp.entries(status="error")] == ["r2"]
    assert insp.find("r1").rec.request_id == "r1" and insp.find("r0") is None
    with pytest.raises(ValueError):
        status_filter("teapot")
    insp.configure(enabled=True, size=2, body_bytes=16, mask=())
    assert [e["id"] for e in insp.entries()] == ["r3", "r2"]
    insp.configure(enabled=False, size=2, body_bytes=16, mask=())
    assert insp.open(_rec("r9"), ()) is None and insp.entries() == []


def test_bodies_are_kept_by_reference_up_to_the_limit():
    cap = Capture(_rec("r1"), RAW, limit=10)
    first, second, third = b"0123456", b"789abc", b"never kept"
    cap.request_chunk(first)
    cap.request_chunk(second)
    cap.request_chunk(third)
    cap.request_end()
    assert cap._req[0] is first and len(cap._req) == 2  # references, not copies; none past the limit
    assert cap.request_body() == b"0123456789" and cap.req_size == 23
    cap.response_chunk(memoryview(bytearray(b"{\"a\": 1}")))  # a reused buffer is copied
    cap.finish()
    e = cap.entry()
    assert e["request_truncated"] is True and e["request_size"] == 23 and e["request_body"] == "0123456789"
    assert e["response_truncated"] is False and e["response_body"] == '{"a": 1}'
    with pytest.raises(NotReplayable) as exc:
        cap.replay_spec()
    assert exc.value.code == "body_not_captured" and "23 bytes" in exc.value.message


def test_masking_of_headers_and_query():
    cap = Capture(_rec("r1", path="/p/q?api_key=SECRET&x=1&access_token=T&sig=Z"), RAW, limit=64)
    cap.request_whole(b'{"k": 1}')
    cap.finish([("Set-Cookie", "a=1"), ("Content-Type", "text/plain")], b"ok")
    e = cap.entry(["x-internal"])
    assert e["path"] == "/p/q" and e["query"] == "api_key=***&x=1&access_token=***&sig=***"
    shown = dict((k.lower(), v) for k, v in e["request_headers"])
    for name in ("authorization", "cookie", "x-api-key", "proxy-authorization", "x-internal"):
        assert shown[name] == "***", name
    assert shown["accept"] == "*/*" and shown["host"] == "h.example"
    assert e["response_headers"][0] == ["Set-Cookie", "***"]
    assert e["response_body"] == "ok" and e["status"] == 200 and e["done"] is True
    # The replay takes the originals, unmasked, without the connection's own headers.
    spec = cap.replay_spec()
    assert ["Authorization", "Bearer s3cret"] in spec["headers"]
    assert not any(k.lower() == "content-length" for k, _ in spec["headers"])
    assert spec["target"] == "/p/q?api_key=SECRET&x=1&access_token=T&sig=Z"
    assert base64.b64decode(spec["body"]) == b'{"k": 1}'


def test_unfinished_bodies_and_websockets_are_not_replayed():
    cap = Capture(_rec("r1"), RAW, limit=64)
    cap.request_chunk(b"part")
    cap.finish()  # the body never ended (the caller went away)
    assert cap.entry()["request_truncated"] is True
    with pytest.raises(NotReplayable, match="not read to its end"):
        cap.replay_spec()
    ws = Capture(_rec("r2"), ((b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")), limit=64, body=False)
    ws.finish()
    assert ws.entry()["websocket"] is True
    with pytest.raises(NotReplayable) as exc:
        ws.replay_spec()
    assert exc.value.code == "websocket"
    bodiless = Capture(_rec("r3"), RAW, limit=64, body=False)
    bodiless.finish()
    assert bodiless.replay_spec()["body"] == ""


def test_binary_bodies_are_base64_and_a_cut_character_is_still_text():
    cap = Capture(_rec("r1"), (), limit=4)
    cap.request_whole(b"\x00\x01\xff\xfe\x10")
    cap.response_chunk("abé".encode())  # 4 bytes: é cut after its first byte when the limit is 3?
    cap.response_chunk(b"more")
    cap.finish()
    e = cap.entry()
    assert e["request_body_encoding"] == "base64" and base64.b64decode(e["request_body"]) == b"\x00\x01\xff\xfe"
    assert e["response_body_encoding"] == "text" and e["response_body"] == "abé"
    cut = Capture(_rec("r2"), (), limit=3)
    cut.response_chunk("abé".encode())
    assert cut.entry()["response_body"] == "ab"


def test_header_names_setting():
    assert header_names("X-One, x-two") == ("x-one", "x-two")
    assert header_names(["X-A"]) == ("x-a",)
    with pytest.raises(ValueError):
        header_names([1])


def test_pages_show_json_pretty_text_and_hex():
    assert body_view('{"a":[1,2]}', "text", [["Content-Type", "application/json"]]) == \
        ("json", '{\n  "a": [\n    1,\n    2\n  ]\n}')
    assert body_view("plain", "text", []) == ("text", "plain")
    kind, shown = body_view(base64.b64encode(b"\x00AB").decode(), "base64", [])
    assert kind == "hex" and shown.startswith("00000000  00 41 42") and shown.endswith(".AB")
    cap = Capture(_rec("r<1>"), RAW, limit=64)
    cap.request_whole(b'{"k": 1}')
    cap.finish([("Content-Type", "application/json")], b'{"ok":true}')
    page = render_detail(cap.entry(), base="/inspector")
    assert 'action="/inspector/r%3C1%3E/replay"' in page and 'id="replay"' in page
    assert "Bearer s3cret" not in page and "&quot;ok&quot;: true" in page
    listing = render_list([cap.entry()], base="/inspector", query={"group": "g1"})
    assert 'href="/inspector/r%3C1%3E"' in listing and 'value="g1"' in listing and "<script>" in listing


def test_a_replay_sends_a_proxy_header_and_the_original_request():
    """send_again against a stand-in entry: the PROXY v1 line first (proxy_protocol), then
    the request with its body framed by Content-Length, marked, on a connection it closes."""
    import asyncio
    from types import SimpleNamespace

    from gateway.workers.inspector import send_again

    async def run() -> tuple[bytes, int, dict]:
        got = bytearray()

        async def entry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.extend(await reader.readuntil(b"\r\n\r\n"))
            got.extend(await reader.readexactly(5))
            writer.write(b"HTTP/1.1 201 Created\r\nX-Request-Id: new-1\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(entry, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = SimpleNamespace(host="0.0.0.0", http_port=port, proxy_protocol=True, http_tls=False,
                              request_timeout=5.0, stream_idle_timeout=5.0)
        spec = {"id": "old-1", "method": "PUT", "host": "h.example", "target": "/a?b=1",
                "headers": [["Authorization", "Bearer s"]], "body": base64.b64encode(b"hello").decode()}
        async with server:
            status, headers = await send_again(cfg, spec)
        return bytes(got), status, headers

    got, status, headers = asyncio.run(run())
    assert status == 201 and headers["x-request-id"] == "new-1"
    line, _, rest = got.partition(b"\r\n")
    assert line.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    assert rest.startswith(b"PUT /a?b=1 HTTP/1.1\r\nHost: h.example\r\nAuthorization: Bearer s\r\n")
    assert b"Content-Length: 5\r\n" in rest and b"x-tunnel-replay: old-1\r\n" in rest and rest.endswith(b"hello")
