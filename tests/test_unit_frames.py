"""Unit tests of the tunnel frame codec (gateway/tunnel/frames.py) and of
request and trace ids (gateway/ids.py). Pure logic: no sockets, no processes."""
from __future__ import annotations

import os
import random
import re

import pytest

from gateway.ids import RequestIds, gateway_prefix, new_instance_id, trace_id_from
from gateway.tunnel import frames
from gateway.tunnel import tunnel_pb2 as pb

HEX32 = re.compile(r"^[0-9a-f]{32}$")

# -- frame builders ------------------------------------------------------------------

BUILT = {
    "request_head": lambda: frames.request_head(
        "ab12-3-1", "t" * 32, method="POST", path="/a/b?x=1&y=%20", scheme="https", authority="api.example:8443",
        headers=[("Content-Type", "application/json"), ("X-A", "1")], end_stream=False, timeout_ms=30000,
        group="g1", target_client="c7", idle_timeout_ms=300000),
    "response_head": lambda: frames.response_head(
        "ab12-3-1", "t" * 32, status=404, reason="Not Found", headers=[("Content-Length", "0")], end_stream=True),
    "data": lambda: frames.data("ab12-3-1", "t" * 32, b"\x00\x01binary\xff", end_stream=True, reply=True),
    "reset": lambda: frames.reset("ab12-3-1", "t" * 32, "upstream_timeout", "no head in 30s", reply=True),
    "window": lambda: frames.window("ab12-3-1", "t" * 32, 65536, reply=False),
    "ping": lambda: frames.ping(2**63 + 5, ack=True, inflight=17),
    "ping_health": lambda: frames.ping(1, ack=False, inflight=0, unhealthy=["db", "cache"]),
    "ping_all_healthy": lambda: frames.ping(2, ack=False, inflight=3, unhealthy=[]),
    "goaway": lambda: frames.goaway("shutting down"),
    "hello": lambda: frames.hello(client_id="c1", group="g1", token="s3cret", version="1.2.3",
                                  capabilities=["window", "grpc"], connection_index=4),
    "welcome": lambda: frames.welcome(accepted=True, config_version="abc123", config_json=b'{"rules":[]}',
                                      heartbeat_ms=5000, worker="w2", window=262144, chunk_size=65536),
    "welcome_refused": lambda: frames.welcome(accepted=False, code="bad_token", message="token not valid"),
    "config": lambda: frames.config("v2", b'{"upstreams":{}}', error=""),
    "config_error": lambda: frames.config("v3", b"", error="groups.g1.rules[0].upstream: unknown"),
}

KIND = {
    "request_head": "headers", "response_head": "headers", "data": "data", "reset": "reset", "window": "window",
    "ping": "ping", "ping_health": "ping", "ping_all_healthy": "ping", "goaway": "goaway", "hello": "hello",
    "welcome": "welcome", "welcome_refused": "welcome", "config": "config", "config_error": "config",
}


@pytest.mark.parametrize("name", sorted(BUILT))
def test_single_frame_round_trip(name):
    frame = BUILT[name]()
    (back,) = frames.decode_batch(frames.join_batch([frames.encode_frame(frame)]))
    assert back == frame
    assert back.WhichOneof("kind") == KIND[name]


def test_batch_of_every_frame_round_trips_in_order():
    built = [BUILT[n]() for n in sorted(BUILT)]
    raw = frames.join_batch(frames.encode_frame(f) for f in built)
    back = list(frames.decode_batch(raw))
    assert back == built
    # The hand-rolled encoding is exactly what protobuf makes of a Batch.
    assert raw == pb.Batch(frames=built).SerializeToString()


def test_builder_fields_survive():
    (req,) = frames.decode_batch(frames.encode_frame(BUILT["request_head"]()))
    h = req.headers
    assert (req.request_id, req.trace_id, req.reply) == ("ab12-3-1", "t" * 32, False)
    assert (h.method, h.path, h.scheme, h.authority) == ("POST", "/a/b?x=1&y=%20", "https", "api.example:8443")
    assert (h.end_stream, h.timeout_ms, h.group, h.target_client, h.idle_timeout_ms) == (False, 30000, "g1", "c7", 300000)

    (resp,) = frames.decode_batch(frames.encode_frame(BUILT["response_head"]()))
    assert resp.reply and resp.headers.status == 404 and resp.headers.reason == "Not Found" and resp.headers.end_stream

    (d,) = frames.decode_batch(frames.encode_frame(BUILT["data"]()))
    assert d.data.data == b"\x00\x01binary\xff" and d.data.end_stream and d.reply

    (p,) = frames.decode_batch(frames.encode_frame(BUILT["ping"]()))
    assert p.ping.nonce == 2**63 + 5 and p.ping.ack and p.ping.inflight == 17


def test_ping_health_report_flag():
    """`unhealthy=None`: no report; `[]`: a report that all upstreams are healthy."""
    (plain, all_ok, some) = frames.decode_batch(frames.join_batch(
        frames.encode_frame(BUILT[n]()) for n in ("ping", "ping_all_healthy", "ping_health")))
    assert not plain.ping.health_report and list(plain.ping.unhealthy_upstreams) == []
    assert all_ok.ping.health_report and list(all_ok.ping.unhealthy_upstreams) == []
    assert some.ping.health_report and list(some.ping.unhealthy_upstreams) == ["db", "cache"]


def test_headers_keep_order_and_repeats():
    pairs = [("Set-Cookie", "a=1"), ("X-B", "2"), ("set-cookie", "b=2"), ("X-A", ""), ("Set-Cookie", "c=3"),
             ("X-Unicode", "caf\u00e9")]
    for fields in (False, True):
        frame = frames.response_head("r", "t", status=200, reason="OK", headers=pairs, end_stream=False, fields=fields)
        (back,) = frames.decode_frames(frames.encode_frame(frame))
        assert frames.header_list(back.headers) == pairs
        assert bool(back.headers.header_fields) == fields and bool(back.headers.headers) != fields


def test_request_head_header_fields_carry_the_same_head():
    kw = dict(method="POST", path="/a?b", scheme="http", authority="h:1", end_stream=False, timeout_ms=5,
              headers=[("A", "1"), ("a", "2"), ("Empty", "")])
    old = frames.request_head("r", "t", **kw)
    new = frames.request_head("r", "t", fields=True, **kw)
    (o,), (n,) = frames.decode_frames(frames.encode_frame(old)), frames.decode_frames(frames.encode_frame(new))
    assert frames.header_list(o.headers) == frames.header_list(n.headers) == kw["headers"]
    o.headers.ClearField("headers")
    n.headers.ClearField("header_fields")
    assert o == n  # everything else identical


def test_header_fields_of_odd_length_are_a_protocol_error():
    frame = frames.request_head("r", "t", method="GET", path="/", scheme="http", authority="h", end_stream=True,
                                timeout_ms=1, headers=[("A", "1")], fields=True)
    frame.headers.header_fields.append("dangling-name")
    with pytest.raises(frames.ProtocolError, match="name without a value"):
        frames.decode_frames(frames.encode_frame(frame))


def test_empty_frame_and_empty_batch():
    assert frames.encode_frame(pb.Frame()) == b"\x0a\x00"
    (back,) = frames.decode_batch(frames.encode_frame(pb.Frame()))
    assert back == pb.Frame() and back.WhichOneof("kind") is None
    assert list(frames.decode_batch(b"")) == []
    assert frames.join_batch([]) == b""


@pytest.mark.parametrize("size,varint_len", [
    (0, 1), (100, 1),
    (126, 2),                  # body grows past 127 bytes with the field overhead
    (200, 2), (16000, 2),
    (16384, 3), (20000, 3), (2_100_000, 4),
])
def test_varint_lengths(size, varint_len):
    chunk = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = frames.data("r", "t", chunk, end_stream=False, reply=False)
    body = frame.SerializeToString()
    encoded = frames.encode_frame(frame)
    assert encoded[0] == 0x0A
    assert len(encoded) == 1 + varint_len + len(body)
    assert encoded[1 + varint_len:] == body
    # Continuation bits: all length bytes but the last have the high bit set.
    length_bytes = encoded[1:1 + varint_len]
    assert all(b & 0x80 for b in length_bytes[:-1]) and not length_bytes[-1] & 0x80
    assert sum((b & 0x7F) << (7 * i) for i, b in enumerate(length_bytes)) == len(body)
    (back,) = frames.decode_batch(encoded + frames.encode_frame(frames.goaway("x")))[:1]
    assert back.data.data == chunk


@pytest.mark.parametrize("n", [127, 128, 16383, 16384, 2**21 - 1, 2**21])
def test_varint_boundaries(n):
    v = frames._varint(n)
    assert len(v) == (n.bit_length() + 6) // 7
    assert sum((b & 0x7F) << (7 * i) for i, b in enumerate(v)) == n


@pytest.mark.parametrize("raw", [
    b"\xff\xff\xff",
    b"garbage!",
    b"\x0a",                          # tag without a length
    b"\x0a\x05ab",                    # length longer than the rest
    b"\x0a\x80",                      # unterminated varint length
    b"\x0b",                          # start-group tag of field 1
    b"\x0a\x02\xff\xff",              # frame body is not a valid Frame
    b"\x0a\x04\x0a\x02\xff\xfe",      # request_id is not UTF-8
])
def test_garbage_raises_protocol_error(raw):
    with pytest.raises(frames.ProtocolError):
        frames.decode_batch(raw)


def test_every_truncation_inside_a_frame_raises():
    built = [BUILT[n]() for n in ("request_head", "data", "welcome")]
    encoded = [frames.encode_frame(f) for f in built]
    raw = frames.join_batch(encoded)
    boundaries = {0}
    for e in encoded:
        boundaries.add(max(boundaries) + len(e))
    cuts = [c for c in range(1, len(raw)) if c not in boundaries]
    assert len(cuts) > 100
    for cut in cuts:
        with pytest.raises(frames.ProtocolError):
            frames.decode_batch(raw[:cut])
    # At a boundary the batch is shorter, not broken.
    assert list(frames.decode_batch(raw[:len(encoded[0])])) == built[:1]


# -- request ids ---------------------------------------------------------------------


def test_request_ids_unique_and_name_their_worker():
    instance = new_instance_id()
    gens = {w: RequestIds(gateway_prefix(instance, w)) for w in (0, 1, 12)}
    seen = set()
    for worker, gen in gens.items():
        for _ in range(1000):
            rid = gen.next()
            assert rid.split("-")[:2] == [instance, str(worker)]
            seen.add(rid)
    assert len(seen) == 3000


def test_request_ids_of_two_instances_differ():
    a = RequestIds(gateway_prefix("aaaa0000", 1))
    b = RequestIds(gateway_prefix("bbbb0000", 1))
    assert {a.next() for _ in range(50)}.isdisjoint({b.next() for _ in range(50)})


def test_request_id_shape():
    gen = RequestIds(gateway_prefix("0a1b2c3d", 5))
    assert [gen.next() for _ in range(3)] == ["0a1b2c3d-5-1", "0a1b2c3d-5-2", "0a1b2c3d-5-3"]


def test_new_instance_id_is_dash_free_hex():
    ids = {new_instance_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"[0-9a-f]{8}", i) for i in ids)


# -- trace ids -----------------------------------------------------------------------

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


def assert_fresh(tid: str, *not_these: str) -> None:
    assert HEX32.match(tid), tid
    assert tid not in not_these and tid != "0" * 32


@pytest.mark.parametrize("value", [TRACEPARENT, f"  {TRACEPARENT} ", f"00-{TRACE}-00f067aa0ba902b7-00"])
def test_trace_id_from_valid_traceparent(value):
    assert trace_id_from({"traceparent": value}) == TRACE


def test_traceparent_wins_over_x_trace_id():
    assert trace_id_from({"traceparent": TRACEPARENT, "x-trace-id": "mine"}) == TRACE


def test_all_zero_traceparent_is_rejected():
    zero = f"00-{'0' * 32}-00f067aa0ba902b7-01"
    assert_fresh(trace_id_from({"traceparent": zero}))
    assert trace_id_from({"traceparent": zero, "x-trace-id": "given-1"}) == "given-1"  # x-trace-id is the fallback


@pytest.mark.parametrize("value", [
    "garbage",
    f"00-{TRACE}",                                    # truncated
    f"00-{TRACE}-00f067aa0ba902b7",                   # no flags
    f"00-{TRACE[:-1]}-00f067aa0ba902b7-01",           # 31 hex
    f"00-{TRACE[:-1]}g-00f067aa0ba902b7-01",          # not hex
    f"00_{TRACE}_00f067aa0ba902b7_01",                # wrong separators
    f"0-{TRACE}-00f067aa0ba902b7-01",                 # short version
    f"00-{TRACE}-00f067aa0ba902-01",                  # short parent id
    "",
])
def test_malformed_traceparent_is_rejected(value):
    tid = trace_id_from({"traceparent": value})
    assert_fresh(tid, TRACE, TRACE[:-1] + "g")
    # ...and x-trace-id is the fallback.
    assert trace_id_from({"traceparent": value, "x-trace-id": "fallback-1"}) == "fallback-1"


@pytest.mark.parametrize("value", [f"{TRACEPARENT}zz", f"{TRACEPARENT}-extra", f"ff-{TRACE}-00f067aa0ba902b7-01"])
def test_traceparent_out_of_spec_is_rejected(value):
    assert trace_id_from({"traceparent": value}) != TRACE


@pytest.mark.parametrize("value", ["abc", "req-123_ABC.def", "A" * 64, "0", "x.y-z_w"])
def test_sane_x_trace_id_is_taken(value):
    assert trace_id_from({"x-trace-id": value}) == value


@pytest.mark.parametrize("value", ["A" * 65, "has space", "slash/no", "semi;colon", "caf\u00e9", "quote\"", "a\tb",
                                   "x\r\nInjected: 1", ""])
def test_bad_x_trace_id_is_replaced(value):
    assert_fresh(trace_id_from({"x-trace-id": value}), value)


def test_x_trace_id_with_trailing_newline_is_replaced():
    assert trace_id_from({"x-trace-id": "abc\n"}) != "abc\n"


def test_trace_id_generated_when_absent():
    a, b = trace_id_from({}), trace_id_from({"other": "x"})
    assert_fresh(a)
    assert_fresh(b)
    assert a != b


@pytest.mark.parametrize("value", [f"01-{TRACE}-00f067aa0ba902b7-01", f"cc-{TRACE}-00f067aa0ba902b7-01-future-field"])
def test_traceparent_of_a_later_version_is_taken(value):
    # W3C trace-context: a parser reads the four known fields of a higher version and ignores what follows a '-'.
    assert trace_id_from({"traceparent": value}) == TRACE


# -- the DATA fast path: encode_data / decode_frames ------------------------------------

def as_tuple(f):
    """A decoded frame in a comparable form, whichever way it was decoded."""
    if isinstance(f, frames.DataFrame):
        return ("data", f.request_id, f.trace_id, f.reply, bytes(f.data), f.end_stream)
    if f.WhichOneof("kind") == "data":
        return ("data", f.request_id, f.trace_id, f.reply, f.data.data, f.data.end_stream)
    return ("pb", f.SerializeToString())


DATA_CASES = [
    ("ab12-3-1", "t" * 32, b"\x00\x01binary\xff", False, True),
    ("ab12-3-1", "t" * 32, b"\x00\x01binary\xff", True, False),
    ("ab12-3-1", "", b"", True, True),           # the end of a body: no payload
    ("ab12-3-1", "t", b"", False, False),        # an empty Data message still says "data"
    ("", "", b"", False, False),
    ("r" * 300, "caf\u00e9", b"y" * 70000, True, True),  # long id, non-ASCII trace, 3-byte lengths
    ("r", "t", b"z" * 127, False, False),
    ("r", "t", b"z" * 128, True, False),
]


@pytest.mark.parametrize("rid,trace,chunk,end,reply", DATA_CASES)
def test_encode_data_is_what_protobuf_writes(rid, trace, chunk, end, reply):
    parts = frames.encode_data(rid, trace, chunk, end_stream=end, reply=reply)
    assert parts[1] is chunk  # the payload is not copied
    assert b"".join(parts) == frames.encode_frame(frames.data(rid, trace, chunk, end_stream=end, reply=reply))
    (back,) = frames.decode_frames(b"".join(parts))
    assert isinstance(back, frames.DataFrame)
    assert as_tuple(back) == ("data", rid, trace, reply, chunk, end)


def test_encode_data_takes_a_view():
    buf = bytes(range(256)) * 10
    view = memoryview(buf)[100:1100]
    assert b"".join(frames.encode_data("r", "t", view, end_stream=False, reply=False)) == \
        frames.encode_frame(frames.data("r", "t", buf[100:1100], end_stream=False, reply=False))


def test_decode_frames_matches_decode_batch_on_every_kind():
    built = [BUILT[n]() for n in sorted(BUILT)] + [frames.data(*c[:3], end_stream=c[3], reply=c[4]) for c in DATA_CASES]
    raw = frames.join_batch(frames.encode_frame(f) for f in built)
    fast = frames.decode_frames(raw)
    assert [as_tuple(f) for f in fast] == [as_tuple(f) for f in frames.decode_batch(raw)]
    assert sum(isinstance(f, frames.DataFrame) for f in fast) == 1 + len(DATA_CASES)


def _field(number: int, payload: bytes) -> bytes:
    return frames._varint(number << 3 | 2) + frames._varint(len(payload)) + payload


@pytest.mark.parametrize("body", [
    # Valid protobuf that no encoder of ours writes: fields out of order, repeated, unknown.
    _field(11, b"\x10\x01" + _field(1, b"late")) + _field(1, b"rid-1"),
    _field(1, b"rid-1") + _field(11, _field(1, b"abc")) + b"\x18\x01",
    _field(1, b"rid-1") + _field(11, _field(1, b"abc")) + _field(99, b"unknown"),
    _field(1, b"rid-1") + _field(11, _field(1, b"ab")) + _field(11, b"\x10\x01"),   # two Data: merged
    _field(1, b"ignored") + _field(1, b"rid-1") + _field(11, _field(1, b"abc")),   # last id wins
    _field(1, b"rid-1") + b"\x18\x02" + _field(11, b"\x10\x05" + _field(1, b"x")),
])
def test_decode_frames_other_layouts_follow_protobuf(body):
    raw = b"\x0a" + frames._varint(len(body)) + body
    (fast,) = frames.decode_frames(raw)
    (slow,) = frames.decode_batch(raw)
    assert as_tuple(fast) == as_tuple(slow)


@pytest.mark.parametrize("raw", [
    b"\xff\xff\xff",
    b"garbage!",
    b"\x0a",
    b"\x0a\x05ab",
    b"\x0a\x80",
    b"\x0b",
    b"\x0a\x02\xff\xff",
    b"\x0a\x04\x0a\x02\xff\xfe",                        # request_id is not UTF-8
    b"\x0a\x06\x0a\x01r\x5a\x05\x0a",                   # Data longer than its frame
    b"\x0a\x07\x0a\x01r\x5a\x02\x0a\x05",               # payload longer than its Data
    b"\x0a\x05\x12\x01\xff\x5a\x00",                    # trace_id is not UTF-8
    b"\x0a\x04\x18\x80\x80\x80",                        # reply's varint runs off the frame
])
def test_decode_frames_garbage_raises_protocol_error(raw):
    with pytest.raises(frames.ProtocolError):
        frames.decode_frames(raw)


def test_decode_frames_every_truncation_raises():
    built = [BUILT[n]() for n in ("request_head", "data", "welcome")] + [frames.data("r", "t", b"q" * 300, end_stream=True, reply=False)]
    encoded = [frames.encode_frame(f) for f in built]
    raw = frames.join_batch(encoded)
    boundaries, at = {0}, 0
    for e in encoded:
        at += len(e)
        boundaries.add(at)
    for cut in range(1, len(raw)):
        if cut in boundaries:
            assert len(frames.decode_frames(raw[:cut])) == sorted(boundaries).index(cut)
        else:
            with pytest.raises(frames.ProtocolError):
                frames.decode_frames(raw[:cut])


@pytest.mark.parametrize("raw", [
    # A frame's length prefix in 10 bytes (value 5) before a valid DATA frame: protobuf refuses it.
    b"\x0a\x85\x80\x80\x80\x80\x80\x80\x80\x80\x00" + b"\x0a\x01r\x5a\x00",
    # Inside a DATA frame: the request id's length in 6 bytes.
    b"\x0a\x0a" + b"\x0a\x81\x80\x80\x80\x80\x00r\x5a\x00",
])
def test_decode_frames_refuses_overlong_lengths_like_protobuf(raw):
    with pytest.raises(frames.ProtocolError):
        frames.decode_batch(raw)
    with pytest.raises(frames.ProtocolError):
        frames.decode_frames(raw)


def test_decode_frames_reads_a_ten_byte_bool_as_protobuf_does():
    # 2**64 as a varint: protobuf keeps 64 bits, so the value is 0 and the flag false.
    big_zero = b"\x80" * 9 + b"\x02"
    body = b"\x0a\x01r" + b"\x18" + big_zero + b"\x5a" + bytes([2 + 1 + 10]) + b"\x0a\x00" + b"\x10" + big_zero
    raw = b"\x0a" + frames._varint(len(body)) + body
    (fast,) = frames.decode_frames(raw)
    (slow,) = frames.decode_batch(raw)
    assert as_tuple(fast) == as_tuple(slow) == ("data", "r", "", False, b"", False)


@pytest.mark.parametrize("rid,trace", [("r-1", "t" * 32), ("", ""), ("é" * 70, "x" * 200)])
@pytest.mark.parametrize("fields", [False, True])
def test_encode_head_equals_protobuf_of_the_whole_frame(rid, trace, fields):
    req = frames.request_headers(method="GET", path="/p?q", scheme="http", authority="h", end_stream=True,
                                 timeout_ms=30000, headers=[("A", "1"), ("B", "x" * 300)], group="g",
                                 idle_timeout_ms=5, fields=fields)
    resp = frames.response_headers(status=200, reason="OK", headers=[("C", "3")], end_stream=False, fields=fields)
    for head, reply in ((req, False), (resp, True), (frames.pb.Headers(), False)):
        whole = frames.pb.Frame(request_id=rid, trace_id=trace, reply=reply, headers=head)
        assert frames.encode_head(rid, trace, head, reply=reply) == frames.encode_frame(whole)
        (back,) = frames.decode_frames(frames.encode_head(rid, trace, head, reply=reply))
        assert back == whole


def _decoded_or_error(decode, raw):
    try:
        return [as_tuple(f) for f in decode(raw)]
    except frames.ProtocolError:
        return "ProtocolError"


def test_decode_frames_reads_neighbouring_frames_of_any_shape_as_protobuf_does():
    # The fast path reads a frame's first fields inline; frames that end early
    # must not make it read into the next one.
    big = frames.encode_frame(frames.data("r" * 200, "t", b"x" * 300, end_stream=True, reply=True))
    for first in (b"\x0a\x00", b"\x0a\x03\x0a\x01r", b"\x0a\x05\x0a\x01r\x12\x00", b"\x0a\x02\x18\x01"):
        raw = first + big + first
        assert _decoded_or_error(frames.decode_frames, raw) == _decoded_or_error(frames.decode_batch, raw)


def test_decode_frames_agrees_with_protobuf_on_damaged_batches():
    rng = random.Random(6)
    built = [BUILT[n]() for n in sorted(BUILT)] + [frames.data(*c[:3], end_stream=c[3], reply=c[4]) for c in DATA_CASES]
    for _ in range(3000):
        raw = bytearray(frames.join_batch(frames.encode_frame(f) for f in rng.sample(built, 3)))
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] = rng.choice((0x00, 0x01, 0x0A, 0x12, 0x18, 0x5A, 0x7F, 0x80, 0xFF,
                                                        rng.randrange(256)))
        raw = bytes(raw)
        assert _decoded_or_error(frames.decode_frames, raw) == _decoded_or_error(frames.decode_batch, raw), raw


def test_new_trace_ids_are_unique_and_differ_in_a_forked_child():
    from gateway.ids import new_trace_id

    ids = {new_trace_id() for _ in range(100_000)}
    assert len(ids) == 100_000
    for tid in list(ids)[:100]:
        assert_fresh(tid)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its generator must not repeat the parent's
        os.write(write, "".join(new_trace_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 200).decode()
    os.close(read)
    assert child != "".join(new_trace_id() for _ in range(3))
