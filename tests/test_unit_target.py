"""The request target, normalised once (gateway/http/target.py): a table."""
from __future__ import annotations

import pytest

from gateway.http.target import BadTarget, Target, normalise_target, remove_dot_segments

HOST = "gw.example:8001"

NORMALISED = [
    # (target as sent, host header) -> (host, path, query)
    (("/", HOST), (HOST, "/", "")),
    (("/other/x?a=1&b=/../c", HOST), (HOST, "/other/x", "?a=1&b=/../c")),  # the query is kept as sent
    (("/other/../x", HOST), (HOST, "/x", "")),
    (("/other/./x/.", HOST), (HOST, "/other/x/", "")),
    (("/a/b/../../..", HOST), (HOST, "/", "")),
    (("/..", HOST), (HOST, "/", "")),
    (("/a/..", HOST), (HOST, "/", "")),
    (("/a/b/..", HOST), (HOST, "/a/", "")),
    (("/%2e%2e/", HOST), (HOST, "/", "")),
    (("/other/%2e%2e/x", HOST), (HOST, "/x", "")),
    (("/other/%2E%2e/x", HOST), (HOST, "/x", "")),
    (("/other/.%2e/x", HOST), (HOST, "/x", "")),
    (("/other/%2e/x", HOST), (HOST, "/other/x", "")),
    (("/a%2Fb/x", HOST), (HOST, "/a%2Fb/x", "")),           # an encoded slash is not a separator
    (("/a%2f..%2fb", HOST), (HOST, "/a%2f..%2fb", "")),     # ... so no dot segment hides behind it
    (("/other/..%2F/x", HOST), (HOST, "/other/..%2F/x", "")),
    (("/%7euser/%41b/a%20b%3f", HOST), (HOST, "/%7euser/%41b/a%20b%3f", "")),  # other encodings kept as sent
    (("/a/%2e%2e%2e/b", HOST), (HOST, "/a/%2e%2e%2e/b", "")),  # three dots: not a dot segment
    (("/a//b", HOST), (HOST, "/a//b", "")),
    (("/...", HOST), (HOST, "/...", "")),
    (("/a.b/c..d", HOST), (HOST, "/a.b/c..d", "")),
    (("http://other.example/other/x", HOST), ("other.example", "/other/x", "")),  # absolute form
    (("HTTP://Other.Example:8080/a/../b?q", HOST), ("other.example:8080", "/b", "?q")),
    (("https://x.example", HOST), ("x.example", "/", "")),
    (("http://x.example?q=1", HOST), ("x.example", "/", "?q=1")),
]


@pytest.mark.parametrize("given,expected", NORMALISED, ids=[g[0] for g, _ in NORMALISED])
def test_normalised(given, expected):
    assert normalise_target(*given) == Target(*expected)


REFUSED = [
    "/x#frag",
    "/x?q#frag",
    "http://x.example/#",
    "*",
    "x.example:443",
    "x/y",
    "ftp://x.example/a",
    "http:///a",
    "http://user:pw@x.example/a",
    "/a%2",
    "/a%zz",
    "/a%",
    "/a b",
    "/a\x00b",
    "",
]


@pytest.mark.parametrize("target", REFUSED)
def test_refused(target):
    with pytest.raises(BadTarget):
        normalise_target(target, HOST)


@pytest.mark.parametrize("path,expected", [
    # RFC 3986 5.4's examples, as absolute paths
    ("/a/b/c/./../../g", "/a/g"),
    ("/b/c/./g", "/b/c/g"),
    ("/b/c/g/.", "/b/c/g/"),
    ("/b/c/..", "/b/"),
    ("/b/c/../..", "/"),
    ("/b/c/../../../g", "/g"),
    ("/./g", "/g"),
    ("/g.", "/g."),
    ("/.g", "/.g"),
    ("/g..", "/g.."),
    ("/..g", "/..g"),
    ("/b/c/./../g", "/b/g"),
    ("/b/c/g/./h", "/b/c/g/h"),
    ("/b/c/g/../h", "/b/c/h"),
])
def test_remove_dot_segments(path, expected):
    assert remove_dot_segments(path) == expected


def test_normalising_twice_changes_nothing():
    for (target, host), _ in NORMALISED:
        once = normalise_target(target, host)
        assert normalise_target(once.path_and_query, once.host) == once
