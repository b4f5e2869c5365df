"""The check of a response head that came down a tunnel (gateway/http/response_head.py):
a table of forged heads, each refused as bad_response; hop-by-hop headers dropped;
a good head passed on unchanged, in order and with its repeats. And the gRPC
entry's check of the metadata a tunnel client sends."""
from __future__ import annotations

import pytest

from gateway.http.grpc_bridge import checked_metadata, decode_trailers
from gateway.http.response_head import check_response_head
from gateway.tunnel.errors import STATUS, TunnelError

GOOD = [
    ("Content-Type", "text/html; charset=utf-8"),
    ("Set-Cookie", "a=1; Path=/"),
    ("x-custom", "caf\xe9 \t tab and obs-text"),
    ("set-cookie", "b=2"),
    ("Cache-Control", "no-cache"),
    ("Content-Length", "11"),
    ("Set-Cookie", "c=3"),
    ("WWW-Authenticate", 'Basic realm="x"'),
    ("X-Empty", ""),
]


def test_a_good_head_passes_unchanged_in_order_and_repeats():
    checked = check_response_head(200, "OK", GOOD)
    assert (checked.status, checked.reason, checked.headers, checked.length) == (200, "OK", GOOD, 11)


def test_without_content_length_the_length_is_left_to_the_gateway():
    checked = check_response_head(404, "", [("Content-Type", "text/plain")])
    assert checked.length is None and checked.headers == [("Content-Type", "text/plain")]


FORGED = {
    "status 0": (0, "", []),
    "status 99": (99, "", []),
    "status 600": (600, "", []),
    "status 999": (999, "", []),
    "status -1": (-1, "", []),
    "101 without upgrade": (101, "Switching Protocols", [("Upgrade", "websocket"), ("Connection", "Upgrade")]),
    "100 as final": (100, "Continue", []),
    "102 as final": (102, "Processing", []),
    "103 as final": (103, "Early Hints", [("Link", "</a.css>; rel=preload")]),
    "CR in a value": (200, "", [("X-A", "1\r")]),
    "LF in a value": (200, "", [("X-A", "1\nX-Injected: yes")]),
    "CRLF splitting in a value": (200, "", [("X-A", "1\r\n\r\nHTTP/1.1 200 OK\r\nX-Injected: yes")]),
    "NUL in a value": (200, "", [("X-A", "a\x00b")]),
    "another control in a value": (200, "", [("X-A", "a\x0bb")]),
    "DEL in a value": (200, "", [("X-A", "a\x7fb")]),
    "beyond latin-1 in a value": (200, "", [("X-A", "\u2028")]),
    "CRLF in a name": (200, "", [("X-A\r\nX-Injected", "yes")]),
    "space in a name": (200, "", [("X A", "1")]),
    "colon in a name": (200, "", [("X-A:", "1")]),
    "empty name": (200, "", [("", "1")]),
    "pseudo-header name": (200, "", [(":status", "200")]),
    "NUL in a name": (200, "", [("X-\x00", "1")]),
    "non-ascii name": (200, "", [("X-\xe9", "1")]),
    "CRLF in the reason": (200, "OK\r\nX-Injected: yes", []),
    "NUL in the reason": (200, "O\x00K", []),
    "CL and TE together": (200, "", [("Content-Length", "5"), ("Transfer-Encoding", "chunked")]),
    "TE before CL": (200, "", [("Transfer-Encoding", "chunked"), ("Content-Length", "5")]),
    "CL not a number": (200, "", [("Content-Length", "5x")]),
    "CL negative": (200, "", [("Content-Length", "-1")]),
    "CL empty": (200, "", [("Content-Length", "")]),
    "CL plus sign": (200, "", [("Content-Length", "+5")]),
    "CL non-ascii digits": (200, "", [("Content-Length", "\u0665")]),
    "CL absurdly long": (200, "", [("Content-Length", "9" * 40)]),
    "two CL that differ": (200, "", [("Content-Length", "5"), ("Content-Length", "6")]),
    "a CL list that differs": (200, "", [("Content-Length", "5, 6")]),
}


@pytest.mark.parametrize("status,reason,headers", FORGED.values(), ids=FORGED.keys())
def test_forged_heads_are_bad_responses(status, reason, headers):
    with pytest.raises(TunnelError) as err:
        check_response_head(status, reason, headers)
    assert err.value.code == "bad_response" and err.value.status == 502
    # The message says what is wrong without repeating the forged bytes raw.
    assert "\r" not in err.value.message and "\n" not in err.value.message and "\x00" not in err.value.message


def test_bad_response_is_a_502_code():
    assert STATUS["bad_response"] == 502


@pytest.mark.parametrize("name", ["Connection", "Keep-Alive", "Transfer-Encoding", "TE", "Trailer", "Upgrade",
                                  "Proxy-Authenticate", "Proxy-Connection", "proxy-anything", "PROXY-Authorization"])
def test_hop_by_hop_headers_are_dropped(name):
    checked = check_response_head(200, "OK", [("X-A", "1"), (name, "close"), ("X-B", "2")])
    assert checked.headers == [("X-A", "1"), ("X-B", "2")]


def test_headers_named_by_connection_are_dropped_but_not_the_length():
    headers = [("Connection", "X-Secret, , content-length"), ("X-Secret", "1"), ("x-secret", "2"),
               ("Content-Length", "3"), ("X-Kept", "yes")]
    checked = check_response_head(200, "OK", headers)
    assert checked.headers == [("Content-Length", "3"), ("X-Kept", "yes")] and checked.length == 3


def test_transfer_encoding_alone_is_dropped_the_gateway_frames_the_body():
    checked = check_response_head(200, "OK", [("Transfer-Encoding", "chunked"), ("X-A", "1")])
    assert checked.headers == [("X-A", "1")] and checked.length is None


def test_repeated_equal_content_lengths_become_one():
    checked = check_response_head(200, "OK", [("X-A", "1"), ("content-length", "007, 7"), ("X-B", "2"),
                                              ("Content-Length", "7")])
    assert checked.headers == [("X-A", "1"), ("content-length", "7"), ("X-B", "2")] and checked.length == 7


def test_a_101_answering_an_upgrade_keeps_upgrade():
    headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Protocol", "chat")]
    checked = check_response_head(101, "Switching Protocols", headers, upgrade=True)
    assert checked.headers == [("Upgrade", "websocket"), ("Sec-WebSocket-Protocol", "chat")]


def test_an_upgrade_request_may_get_any_final_status():
    checked = check_response_head(403, "Forbidden", [("Upgrade", "websocket"), ("X-A", "1")], upgrade=True)
    assert checked.headers == [("X-A", "1")]


@pytest.mark.parametrize("status", [200, 204, 299, 304, 404, 599])
def test_statuses_in_range(status):
    assert check_response_head(status, "", []).status == status


# -- gRPC metadata from a tunnel client ----------------------------------------------------


def test_good_metadata_passes():
    assert checked_metadata([("x-a", "1"), ("X-B", "two words"), ("x-c-bin", "AAE=")]) == (
        ("x-a", "1"), ("x-b", "two words"), ("x-c-bin", b"\x00\x01"))


@pytest.mark.parametrize("pair", [("x-a", "1\n2"), ("x-a", "caf\xe9"), ("x!", "1"), ("x a", "1"),
                                  ("x-c-bin", "not base64!!!=")], ids=str)
def test_metadata_grpc_cannot_carry_is_a_bad_response(pair):
    with pytest.raises(TunnelError) as err:
        checked_metadata([pair])
    assert err.value.code == "bad_response"


def test_trailers_with_bad_metadata_are_a_bad_response():
    assert decode_trailers(b"grpc-status: 5\r\ngrpc-message: gone\r\nx-a: 1") == (5, "gone", (("x-a", "1"),))
    with pytest.raises(TunnelError):
        decode_trailers(b"grpc-status: 0\r\nx-a: 1\x00")
