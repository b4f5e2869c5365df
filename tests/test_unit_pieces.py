"""A big tunnel message kept in the reads it arrived in (gateway/tunnel/pieces.py):
its frames decode as the joined message's do, a big payload becomes views of the
reads (no copy), and a batch that is no batch fails the same way. Pure logic."""
from __future__ import annotations

import os
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.inspection import Capture
from gateway.tunnel import frames
from gateway.tunnel import tunnel_pb2 as pb
from gateway.tunnel.h2_frames import MESSAGE_PREFIX, H2Stream
from gateway.tunnel.pieces import JOIN_UNDER, Pieces, decode_message


def _batch(sizes: list[int]) -> bytes:
    """A batch as the tunnel sends one: per request a head, a body frame and a window."""
    parts = []
    for i, size in enumerate(sizes):
        rid = f"req-{i}"
        parts.append(frames.encode_frame(frames.request_head(
            rid, "t" * 32, method="POST", path="/up", scheme="http", authority="a", headers=[("X-N", str(i))],
            end_stream=False, timeout_ms=0)))
        parts.append(b"".join(frames.encode_data(rid, "t" * 32, os.urandom(size), end_stream=i % 2 == 0, reply=False)))
        parts.append(frames.encode_frame(frames.window(rid, "t" * 32, 1000 + i, reply=True)))
    return b"".join(parts)


def _pieces(raw: bytes, cuts: list[int]) -> Pieces:
    """raw cut at `cuts`, each piece inside a read with other bytes around it."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(raw))), len(raw)]
    spans = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        before = b"<" * (i % 4)
        spans.append((before + raw[a:b] + b">>", len(before), len(before) + b - a))
    return Pieces(spans)


def _logical(decoded: list) -> list:
    """Frames as comparable values, a body's DataFrames split across reads joined back."""
    out: list = []
    for f in decoded:
        if type(f) is frames.DataFrame:
            if out and out[-1][0] == "data" and out[-1][1] == f.request_id and not out[-1][4]:
                _, rid, trace, data, _ = out.pop()
                out.append(("data", rid, trace, data + bytes(f.data), f.end_stream))
            else:
                out.append(("data", f.request_id, f.trace_id, bytes(f.data), f.end_stream))
        else:
            out.append(("frame", f.SerializeToString()))
    return out


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 5, 16384, 16385, 70000, 300000]), min_size=1, max_size=5),
       cuts=st.lists(st.integers(min_value=1, max_value=1_200_000), max_size=10))
def test_a_batch_in_pieces_decodes_as_the_batch_joined(sizes, cuts):
    raw = _batch(sizes)
    p = _pieces(raw, cuts)
    assert p.joined() == raw and len(p) == len(raw)
    assert _logical(decode_message(p)) == _logical(frames.decode_frames(raw))


def test_a_big_payload_across_reads_is_views_of_them():
    raw = _batch([300000])
    p = _pieces(raw, [len(raw) // 3, 2 * len(raw) // 3])
    body = [f for f in decode_message(p) if type(f) is frames.DataFrame]
    assert len(body) == 3  # one a read the payload spans
    assert all(type(f.data) is memoryview and type(f.data.obj) is bytes for f in body)
    assert [f.end_stream for f in body] == [False, False, True]
    assert b"".join(body_part.data for body_part in body) == frames.decode_frames(raw)[1].data


def test_a_small_payload_across_reads_is_bytes():
    raw = _batch([1000])
    p = _pieces(raw, [len(raw) - 500])
    body = [f for f in decode_message(p) if type(f) is frames.DataFrame]
    assert len(body) == 1 and type(body[0].data) is bytes and len(body[0].data) == 1000


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(min_size=1, max_size=400), at=st.integers(min_value=0, max_value=200_000),
       cuts=st.lists(st.integers(min_value=1, max_value=300_000), max_size=6))
def test_a_broken_batch_fails_as_the_batch_joined(junk, at, cuts):
    raw = _batch([70000, 5])
    at = min(at, len(raw))
    bad = raw[:at] + junk + raw[at + len(junk):]
    try:
        expected = _logical(frames.decode_frames(bad))
    except frames.ProtocolError:
        expected = None
    try:
        got = _logical(decode_message(_pieces(bad, cuts)))
    except frames.ProtocolError:
        got = None
    assert got == expected


def test_a_frame_in_another_layout_across_reads_goes_to_protobuf():
    # protobuf writes the fields in order; this one puts the payload first: still valid, not our layout
    f = pb.Frame(request_id="r1", trace_id="t1", data=pb.Data(data=os.urandom(100000), end_stream=True))
    inner = pb.Data(data=f.data.data, end_stream=True).SerializeToString()
    odd = b"\x5a" + frames._varint(len(inner)) + inner + b"\x0a\x02r1\x12\x02t1"
    raw = b"\x0a" + frames._varint(len(odd)) + odd
    got = decode_message(_pieces(raw, [50000]))
    assert len(got) == 1 and got[0].request_id == "r1" and bytes(got[0].data) == f.data.data and got[0].end_stream


def _h2_message(payload: bytes) -> bytes:
    return MESSAGE_PREFIX.pack(0, len(payload)) + payload


def test_the_h2_reader_keeps_only_a_big_message_in_pieces():
    small, big = os.urandom(1000), os.urandom(JOIN_UNDER + 10)
    stream = H2Stream(1, 65535)
    for payload in (small, big):
        wire = _h2_message(payload)
        half = len(wire) // 2
        stream.take(wire, 0, half, 1 << 30)  # each message across two reads
        stream.take(b"x" + wire + b"y", 1 + half, 1 + len(wire), 1 << 30)
    first, second = stream.messages
    assert first == small
    assert type(second) is Pieces and second.joined() == big and stream.queued == len(small) + len(big)


def test_the_capture_copies_only_the_preview_of_a_view():
    read = os.urandom(200000)
    cap = Capture(rec=None, request_headers=[], limit=1000)
    cap.request_chunk(memoryview(read)[10:150000])
    cap.response_chunk(memoryview(read)[5:100])
    cap.response_chunk(memoryview(read)[200:100000])
    assert all(type(c) is bytes for c in cap._req + cap._resp)  # no view keeps the read alive
    assert cap.request_body() == read[10:1010] and cap.req_size == 149990
    assert cap.response_body() == read[5:100] + read[200:1105] and cap.resp_size == 95 + 99800


def test_a_view_keeps_at_most_a_few_times_itself_alive():
    # 20 KiB payloads in a 1 MiB batch: a view would keep the whole batch for each; copied.
    raw = _batch([20000] * 3 + [1000000])
    body = [f for f in frames.decode_frames(raw) if type(f) is frames.DataFrame]
    assert [type(f.data) for f in body] == [bytes, bytes, bytes, memoryview]
    # The same across reads: a piece small beside its read is copied, a big one is a view.
    raw = _batch([300000])
    p = _pieces(raw, [len(raw) - 17000])  # the payload's last ~17 KB in a read of their own
    first, last = [f for f in decode_message(p) if type(f) is frames.DataFrame]
    assert type(first.data) is memoryview and type(last.data) is memoryview
    p = _pieces(raw + b"\x0a\x00" * 100000, [len(raw) - 17000])  # now the last read is 200 KB more
    first, last = [f for f in decode_message(p) if type(f) is frames.DataFrame][:2]
    assert type(first.data) is memoryview and type(last.data) is bytes and len(last.data) < 17000


def test_many_small_reads_are_joined_not_kept():
    payload = os.urandom(JOIN_UNDER * 2)
    wire = _h2_message(payload)
    stream = H2Stream(1, 65535)
    for i in range(0, len(wire), 1000):  # reads of 1000 bytes: 132 spans, under VIEW_OVER each on average
        stream.take(wire[i:i + 1000], 0, len(wire[i:i + 1000]), 1 << 30)
    (message,) = stream.messages
    assert type(message) is bytes and message == payload


def test_a_batch_that_ends_inside_a_frame_tag_is_a_protocol_error():
    raw = _batch([70000])
    for tail in (b"\x0a", b"\x0a\x80", b"\x0a\xff\xff"):
        for cut in (len(raw) - 3, len(raw) + len(tail) - 1):
            try:
                decode_message(_pieces(raw + tail, [cut]))
            except frames.ProtocolError:
                pass
            else:
                raise AssertionError(f"{tail!r} cut at {cut} decoded")


def test_decoding_many_spans_costs_about_what_the_joined_batch_does():
    # Linear in the spans: a lookup from the first span each time made this 80 s, not a second.
    window = frames.encode_frame(frames.window("r1", "t" * 32, 5, reply=True))
    raw = window * ((1 << 20) // len(window))
    p = Pieces([(raw, i, min(i + 64, len(raw))) for i in range(0, len(raw), 64)])
    started = time.perf_counter()
    decoded = decode_message(p)
    in_pieces = time.perf_counter() - started
    started = time.perf_counter()
    joined = frames.decode_frames(raw)
    whole = time.perf_counter() - started
    assert len(decoded) == len(joined)
    assert in_pieces < 20 * whole + 1.0
