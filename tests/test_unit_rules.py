"""Unit tests of request matching (gateway/rules.py) and of the header edits a
proxy makes (gateway/http/headers.py). Pure logic: no sockets, no processes."""
from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gateway.http.headers import (
    HOP_BY_HOP, apply_rule, end_to_end, forwarded, has_body_response, header_bytes, is_trusted,
)
from gateway.settings import networks
from gateway.rules import Rule, first_match, host_matches, parse_rules, path_matches, strip_port
from gateway.settings import ConfigError


def names(rule: Rule | None) -> str | None:
    return None if rule is None else rule.name


# -- host ----------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,host,ok", [
    ("", "anything.example", True),
    ("*", "anything.example", True),
    ("api.example.com", "api.example.com", True),
    ("api.example.com", "www.example.com", False),
    ("api.example.com", "api.example.com.evil", False),
    ("api.example.com", "x.api.example.com", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "example.com", False),          # the bare domain is not a subdomain
    ("*.example.com", ".example.com", False),         # an empty label is not a subdomain
    ("*.example.com", "badexample.com", False),       # suffix must start at a label boundary
    ("*.example.com", "a.example.com.evil", False),
])
def test_host_matches(pattern, host, ok):
    assert host_matches(pattern, host) is ok


@pytest.mark.parametrize("raw,host", [
    ("example.com", "example.com"),
    ("Example.COM", "example.com"),
    ("Example.com:8080", "example.com"),
    (" example.com:80 ", "example.com"),
    ("[::1]:8443", "[::1]"),
    ("[::1]", "[::1]"),
    ("127.0.0.1:9", "127.0.0.1"),
])
def test_strip_port_lowers_and_drops_the_port(raw, host):
    assert strip_port(raw) == host


@pytest.mark.parametrize("request_host", [
    "api.example.com", "API.EXAMPLE.COM", "Api.Example.Com:8443", "api.example.com:80",
])
def test_first_match_host_ignores_case_and_port(request_host):
    rules = parse_rules([{"group": "g", "host": "API.Example.com", "name": "exact"}], "f.toml", "routes", "group", {"g"})
    assert names(first_match(rules, request_host, "/", "GET", {})) == "exact"


@pytest.mark.parametrize("request_host,expected", [
    ("a.example.com", "wild"),
    ("A.B.Example.com:8080", "wild"),
    ("example.com", "fallback"),
    ("example.com:8080", "fallback"),
    ("other.org", "fallback"),
])
def test_first_match_wildcard_host(request_host, expected):
    rules = (Rule("wild", "g1", host="*.example.com"), Rule("fallback", "g2"))
    assert names(first_match(rules, request_host, "/", "GET", {})) == expected


# -- path ----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix,path,ok", [
    ("", "/x", True),
    ("/", "/", True),
    ("/", "/deep/path", True),
    ("/api", "/api", True),
    ("/api", "/api/", True),
    ("/api", "/api/v1/items", True),
    ("/api", "/api?x=1", True),
    ("/api", "/apix", False),
    ("/api", "/ap", False),
    ("/api", "/API", False),             # paths are case-sensitive
    ("/api", "/v1/api", False),
    ("/api/", "/api/x", True),
    ("/api/", "/api", False),
])
def test_path_prefix(prefix, path, ok):
    assert path_matches(prefix, path) is ok


# -- methods and headers -------------------------------------------------------------


@pytest.mark.parametrize("method,ok", [("GET", True), ("POST", True), ("PUT", False), ("DELETE", False)])
def test_methods_restrict(method, ok):
    rule = Rule("r", "g", methods=frozenset({"GET", "POST"}))
    assert rule.matches("h", "/", method, {}) is ok


def test_no_methods_means_any_method():
    rule = Rule("r", "g")
    assert all(rule.matches("h", "/", m, {}) for m in ("GET", "POST", "PATCH", "OPTIONS"))


def test_parsed_methods_are_upper_case():
    (rule,) = parse_rules([{"group": "g", "methods": ["get", "Post"]}], "f.toml", "routes", "group", {"g"})
    assert rule.methods == frozenset({"GET", "POST"})
    assert first_match((rule,), "h", "/", "POST", {}) is rule
    assert first_match((rule,), "h", "/", "PUT", {}) is None


@pytest.mark.parametrize("headers,ok", [
    ({"x-env": "canary"}, True),
    ({"X-Env": "canary"}, True),           # header names are case-insensitive
    ({"x-env": "Canary"}, False),          # values are compared exactly
    ({"x-env": "canary "}, False),
    ({"x-env": "prod"}, False),
    ({}, False),
    ({"x-other": "canary"}, False),
])
def test_header_equals(headers, ok):
    (rule,) = parse_rules([{"group": "g", "headers": {"X-Env": "canary"}}], "f.toml", "routes", "group", {"g"})
    assert rule.headers == (("x-env", "canary"),)
    assert rule.matches("h", "/", "GET", CIMultiDict(headers)) is ok


def test_all_headers_must_match():
    rule = Rule("r", "g", headers=(("a", "1"), ("b", "2")))
    assert rule.matches("h", "/", "GET", CIMultiDict({"a": "1", "b": "2"}))
    assert not rule.matches("h", "/", "GET", CIMultiDict({"a": "1"}))
    assert not rule.matches("h", "/", "GET", CIMultiDict({"a": "1", "b": "3"}))


def test_service_prefix_for_grpc_routes():
    rule = Rule("r", "g", service_prefix="pkg.Echo")
    assert rule.matches("", "/pkg.Echo/Say", "POST", {})
    assert not rule.matches("", "/pkg.Other/Say", "POST", {})


# -- first match wins ----------------------------------------------------------------


RULES = (
    Rule("post-api", "g-api", host="api.example.com", path_prefix="/v1", methods=frozenset({"POST"})),
    Rule("canary", "g-canary", host="*.example.com", headers=(("x-canary", "1"),)),
    Rule("api", "g-api2", host="api.example.com"),
    Rule("wild", "g-wild", host="*.example.com"),
    Rule("static", "g-static", path_prefix="/static"),
    Rule("default", "g-default"),
)


@pytest.mark.parametrize("host,path,method,headers,expected", [
    ("api.example.com", "/v1/x", "POST", {}, "post-api"),
    ("api.example.com", "/v1/x", "POST", {"x-canary": "1"}, "post-api"),   # earlier rule wins
    ("api.example.com", "/v1/x", "GET", {"x-canary": "1"}, "canary"),
    ("api.example.com", "/v1/x", "GET", {}, "api"),
    ("api.example.com", "/v10", "POST", {}, "api"),
    ("www.example.com", "/static/a.css", "GET", {}, "wild"),              # wild precedes static
    ("other.org", "/static/a.css", "GET", {}, "static"),
    ("other.org", "/staticx", "GET", {}, "default"),
    ("example.com", "/", "GET", {"x-canary": "1"}, "default"),
])
def test_first_match_wins(host, path, method, headers, expected):
    assert names(first_match(RULES, host, path, method, CIMultiDict(headers))) == expected


def test_first_match_order_matters():
    a, b = Rule("a", "g1"), Rule("b", "g2")
    assert first_match((a, b), "h", "/", "GET", {}) is a
    assert first_match((b, a), "h", "/", "GET", {}) is b


def test_no_match_is_none():
    assert first_match(RULES[:4], "other.org", "/", "GET", {}) is None
    assert first_match((), "h", "/", "GET", {}) is None


# -- path rewriting ------------------------------------------------------------------


@pytest.mark.parametrize("prefix,strip,path,expected", [
    ("/svc", True, "/svc/a/b", "/a/b"),
    ("/svc", True, "/svc", "/"),
    ("/svc", True, "/svc/", "/"),
    ("/svc", True, "/svc?q=1", "/?q=1"),
    ("/svc", True, "/svc/a?q=1", "/a?q=1"),
    ("/svc/", True, "/svc/a", "/a"),
    ("/a/b", True, "/a/b/c", "/c"),
    ("/svc", False, "/svc/a", "/svc/a"),
    ("/", True, "/svc/a", "/svc/a"),
    ("", True, "/svc/a", "/svc/a"),
])
def test_rewrite_path(prefix, strip, path, expected):
    assert Rule("r", "g", path_prefix=prefix, strip_prefix=strip).rewrite_path(path) == expected


# -- parse_rules ---------------------------------------------------------------------


def test_parse_rules_defaults_and_values():
    raw = [
        {"group": "g", "host": "*.Example.com", "path_prefix": "/api", "strip_prefix": True, "timeout": 5,
         "set_host": "internal", "add_headers": {"X-A": "1"}, "remove_headers": ["Cookie"], "name": "n"},
        {"group": "h"},
    ]
    first, second = parse_rules(raw, "f.toml", "routes", "group", {"g", "h"}, default_timeout=7.0)
    assert (first.name, first.target, first.host, first.path_prefix) == ("n", "g", "*.example.com", "/api")
    assert first.strip_prefix and first.timeout == 5.0 and first.set_host == "internal"
    assert first.add_headers == (("x-a", "1"),) and first.remove_headers == frozenset({"cookie"})
    assert (second.name, second.host, second.path_prefix, second.timeout) == ("routes[1]", "", "/", 7.0)
    assert parse_rules(None, "f.toml", "routes", "group", set()) == ()


@pytest.mark.parametrize("item,key", [
    ({"group": "nope"}, "routes[0].group"),
    ({}, "routes[0].group"),
    ({"group": "g", "bogus": 1}, "routes[0].bogus"),
    ({"group": "g", "host": "a.*.com"}, "routes[0].host"),
    ({"group": "g", "host": "*example.com"}, "routes[0].host"),
    ({"group": "g", "path_prefix": "api"}, "routes[0].path_prefix"),
    ({"group": "g", "timeout": 0}, "routes[0].timeout"),
    ({"group": "g", "strip_prefix": "yes"}, "routes[0].strip_prefix"),
    ({"group": "g", "methods": "GET"}, "routes[0].methods"),
    ({"group": "g", "headers": {"a": 1}}, "routes[0].headers"),
    ({"group": "g", "idle_timeout": -1}, "routes[0].idle_timeout"),
])
def test_parse_rules_errors_name_file_and_key(item, key):
    with pytest.raises(ConfigError) as info:
        parse_rules([item], "gw.toml", "routes", "group", {"g"})
    assert info.value.file == "gw.toml" and info.value.key == key
    assert str(info.value).startswith(f"gw.toml: {key}: ")


# -- hop-by-hop headers --------------------------------------------------------------


def _raw(pairs):
    """Headers as aiohttp hands them over (`raw_headers`)."""
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs]


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP) + ["Keep-Alive", "TRANSFER-ENCODING", "Upgrade", "TE"])
def test_end_to_end_drops_fixed_hop_by_hop(name):
    assert end_to_end(_raw([("Accept", "*/*"), (name, "x"), ("X-A", "1")])) == [("Accept", "*/*"), ("X-A", "1")]


@pytest.mark.parametrize("name", ["Proxy-Foo", "proxy-connection", "PROXY-X-Whatever"])
def test_end_to_end_drops_proxy_star(name):
    assert end_to_end(_raw([(name, "v"), ("Host", "h")])) == [("Host", "h")]


def test_end_to_end_forwards_a_requests_proxy_authorization():
    headers = [("Proxy-Authorization", "Basic c2VjcmV0"), ("Host", "h")]
    assert end_to_end(_raw(headers)) == headers


@pytest.mark.parametrize("name", ["Proxy-Authorization", "proxy-authenticate", "Proxy-Foo"])
def test_end_to_end_drops_a_responses_proxy_star(name):
    assert end_to_end(_raw([(name, "v"), ("X-A", "1")]), response=True) == [("X-A", "1")]


def test_end_to_end_drops_headers_named_in_connection():
    headers = [
        ("Host", "h"),
        ("Connection", "keep-alive, X-Secret ,  x-other"),
        ("X-Secret", "1"),
        ("X-Other", "2"),
        ("Connection", "Close, X-Third"),
        ("X-Third", "3"),
        ("X-Kept", "4"),
    ]
    assert end_to_end(_raw(headers)) == [("Host", "h"), ("X-Kept", "4")]


def test_end_to_end_keeps_order_repeats_and_case():
    headers = [("Set-Cookie", "a=1"), ("X-A", "1"), ("set-cookie", "b=2"), ("Content-Type", "text/plain")]
    assert end_to_end(_raw(headers)) == headers


def test_end_to_end_empty_connection_tokens_drop_nothing_else():
    assert end_to_end(_raw([("Connection", " , ,"), ("X-A", "1")])) == [("X-A", "1")]


# -- forwarded headers ---------------------------------------------------------------


def test_forwarded_adds_all_three():
    out = forwarded([("Host", "h")], remote="10.0.0.1", proto="https", host="public.example")
    assert out == [("Host", "h"), ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "https"),
                   ("X-Forwarded-Host", "public.example")]


SPOOFED = [("x-forwarded-for", "1.1.1.1, 2.2.2.2"), ("Host", "h"), ("X-Forwarded-For", "3.3.3.3"),
           ("X-Forwarded-Proto", "https"), ("x-forwarded-host", "orig.example")]


def test_forwarded_replaces_what_an_untrusted_caller_sent():
    out = forwarded(SPOOFED, remote="10.0.0.1", proto="http", host="mine.example")
    assert out == [("Host", "h"), ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "http"),
                   ("X-Forwarded-Host", "mine.example")]


def test_forwarded_appends_to_a_trusted_proxys_x_forwarded_for():
    out = forwarded(SPOOFED, remote="10.0.0.1", proto="http", host="h", trusted=True)
    xff = [v for n, v in out if n.lower() == "x-forwarded-for"]
    assert xff == ["1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.1"]


def test_forwarded_keeps_a_trusted_proxys_proto_and_host():
    headers = [("X-Forwarded-Proto", "https"), ("x-forwarded-host", "orig.example")]
    out = forwarded(headers, remote="10.0.0.1", proto="http", host="mine.example", trusted=True)
    assert ("X-Forwarded-Proto", "https") in out and ("x-forwarded-host", "orig.example") in out
    assert [n.lower() for n, _ in out].count("x-forwarded-proto") == 1
    assert [n.lower() for n, _ in out].count("x-forwarded-host") == 1
    assert ("X-Forwarded-Proto", "http") not in out and ("X-Forwarded-Host", "mine.example") not in out


def test_forwarded_without_remote_or_host():
    assert forwarded([], remote="", proto="http", host="") == [("X-Forwarded-Proto", "http")]
    assert forwarded([("X-Forwarded-For", "1.1.1.1")], remote="", proto="http", host="", trusted=True) == [
        ("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-Proto", "http")]
    assert forwarded([("X-Forwarded-For", "1.1.1.1")], remote="", proto="http", host="") == [
        ("X-Forwarded-Proto", "http")]


def test_forwarded_drops_an_untrusted_callers_rfc7239_forwarded():
    headers = [("Forwarded", "for=6.6.6.6;proto=https"), ("Host", "h"), ("forwarded", 'for="[2001:db8::6]"')]
    out = forwarded(headers, remote="10.0.0.1", proto="http", host="h")
    assert out == [("Host", "h"), ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "http"),
                   ("X-Forwarded-Host", "h")]
    # A trusted proxy's passes on.
    trusted = forwarded(headers, remote="10.0.0.1", proto="http", host="h", trusted=True)
    assert [p for p in trusted if p[0].lower() == "forwarded"] == [headers[0], headers[2]]


# A CGI or WSGI backend reads `_` and `-` as one (HTTP_X_FORWARDED_FOR): these are the real ones to it.
UNDERSCORED = [("X_Forwarded_For", "6.6.6.6"), ("X-Forwarded_For", "6.6.6.7"), ("x_forwarded-for", "6.6.6.8"),
               ("X_FORWARDED_PROTO", "https"), ("X-Forwarded_Host", "evil.example"), ("x_forwarded_host", "evil2")]


@pytest.mark.parametrize("trusted", [False, True])
def test_forwarded_drops_underscore_variants_of_x_forwarded(trusted):
    out = forwarded([("Host", "h"), *UNDERSCORED, ("X_Other", "kept")], remote="10.0.0.1", proto="http",
                    host="h", trusted=trusted)
    assert out == [("Host", "h"), ("X_Other", "kept"), ("X-Forwarded-For", "10.0.0.1"),
                   ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "h")]


def test_is_trusted_answers_from_its_cache_as_it_would_without():
    proxies = ("10.0.0.0/8",)
    for _ in range(3):  # the second and third from the cache
        assert is_trusted("10.1.2.3", proxies) is True and is_trusted("11.1.2.3", proxies) is False
    # The answer is per setting: another trusted_proxies (a reload) is asked anew.
    assert is_trusted("11.1.2.3", ("11.0.0.0/8",)) is True and is_trusted("10.1.2.3", ("11.0.0.0/8",)) is False


@pytest.mark.parametrize("remote,trusted", [
    ("10.1.2.3", True), ("10.255.0.1", True), ("11.0.0.1", False), ("192.0.2.7", True), ("192.0.2.8", False),
    ("::ffff:10.0.0.9", True), ("2001:db8::1", True), ("2001:db9::1", False), ("fe80::1%eth0", False),
    ("", False), ("not-an-ip", False),
])
def test_is_trusted_by_address_or_cidr(remote, trusted):
    assert is_trusted(remote, ("10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32")) is trusted
    assert is_trusted(remote, ()) is False


def test_networks_setting_validates_and_normalises():
    assert networks(["10.0.0.0/8", "127.0.0.1", "::1"]) == ("10.0.0.0/8", "127.0.0.1/32", "::1/128")
    assert networks("10.1.0.0/16, 127.0.0.1") == ("10.1.0.0/16", "127.0.0.1/32")
    assert networks([]) == () and networks("") == ()
    for bad in (["10.0.0.300"], ["example.com"], "1.2.3.4/40", [1], 5):
        with pytest.raises(ValueError):
            networks(bad)


# -- rule header edits ---------------------------------------------------------------


def test_apply_rule_removes_and_adds():
    (rule,) = parse_rules(
        [{"group": "g", "remove_headers": ["Cookie", "X-Debug"], "add_headers": {"X-Tenant": "t1", "Accept": "json"}}],
        "f.toml", "routes", "group", {"g"},
    )
    headers = [("Host", "h"), ("cookie", "a"), ("X-DEBUG", "1"), ("ACCEPT", "*/*"), ("X-Keep", "k"), ("Cookie", "b")]
    out = apply_rule(headers, rule)
    assert out == [("Host", "h"), ("X-Keep", "k"), ("x-tenant", "t1"), ("accept", "json")]


def test_apply_rule_set_host_replaces_host():
    rule = Rule("r", "g", set_host="internal.svc:8080")
    out = apply_rule([("host", "public.example"), ("X-A", "1")], rule)
    assert out == [("X-A", "1"), ("Host", "internal.svc:8080")]


def test_apply_rule_without_edits_hands_back_the_headers():
    headers = [("Host", "h"), ("X-A", "1"), ("X-A", "2")]
    assert apply_rule(headers, Rule("r", "g")) is headers  # no copy on every request


def test_apply_rule_with_edits_leaves_its_input_alone():
    headers = [("Host", "h"), ("X-A", "1")]
    out = apply_rule(headers, Rule("r", "g", remove_headers=frozenset({"x-a"}), add_headers=(("X-B", "2"),)))
    assert out == [("Host", "h"), ("X-B", "2")] and headers == [("Host", "h"), ("X-A", "1")]


# -- responses and sizes -------------------------------------------------------------


@pytest.mark.parametrize("method,status,body", [
    ("GET", 200, True),
    ("POST", 201, True),
    ("GET", 404, True),
    ("GET", 500, True),
    ("HEAD", 200, False),
    ("HEAD", 404, False),
    ("GET", 204, False),
    ("GET", 304, False),
    ("GET", 100, False),
    ("GET", 101, False),
    ("GET", 103, False),
    ("GET", 199, False),
    ("GET", 205, True),
])
def test_has_body_response(method, status, body):
    assert has_body_response(method, status) is body


def test_header_bytes_counts_name_value_and_separators():
    raw = [(b"Host", b"example.com"), (b"X-A", b"")]
    assert header_bytes(raw) == (4 + 11 + 4) + (3 + 0 + 4)
    assert header_bytes([]) == 0


def test_end_to_end_decodes_latin1_keeping_order_and_repeats():
    raw = [(b"Set-Cookie", b"a"), (b"X", b"caf\xe9"), (b"Set-Cookie", b"b")]
    assert end_to_end(raw) == [("Set-Cookie", "a"), ("X", "café"), ("Set-Cookie", "b")]


def test_end_to_end_drops_the_names_given():
    raw = _raw([("Expect", "100-continue"), ("X-A", "1"), ("EXPECT", "x")])
    assert end_to_end(raw, frozenset({b"expect"})) == [("X-A", "1")]
