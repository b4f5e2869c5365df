"""Unit tests of configuration loading: gateway/config.py, gateway/settings.py,
gateway/groupconfig.py and gateway/client/config.py, and of what the
grpc_event_engine setting does to the environment (gateway/grpc_io.py). Files
are written to tmp_path; no sockets, no processes."""
from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import pickle
import socket
from pathlib import Path

import pytest

from gateway.client.config import CLIENT_SETTINGS, load_client_config
from gateway.client.config import ENV_PREFIX as CLIENT_ENV
from gateway.config import AUTO_CHUNK, ENV_PREFIX, GATEWAY_SETTINGS, load_gateway_config
from gateway.groupconfig import group_config_from_json, parse_group_config, parse_upstreams
from gateway.grpc_io import choose_grpc_io, grpc_io_in_use
from gateway.settings import (
    ConfigError, Setting, add_arguments, apply_env, apply_overrides, host_port, load_section, port, positive_float,
    boolean, read_toml, string,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """The tests decide which TUNNEL_* variables exist."""
    for name in list(os.environ):
        if name.startswith((ENV_PREFIX, CLIENT_ENV)):
            monkeypatch.delenv(name)


def gateway_toml(*, gateway: str = "", group: str = "", route: str = "", upstream: str = "", tail: str = "") -> str:
    return f"""
[gateway]
{gateway}

[groups.g1]
tokens = ["s3cret"]
{group}

[[groups.g1.rules]]
upstream = "web"

[groups.g1.upstreams.web]
servers = ["http://127.0.0.1:9000"]

[[routes]]
group = "g1"
{route}

[upstreams.out]
servers = ["https://api.example.com"]
{upstream}

[[forward]]
upstream = "out"
{tail}
"""


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def parse_flags(argv: list[str], settings=GATEWAY_SETTINGS, prefix=ENV_PREFIX) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, settings, prefix)
    return parser.parse_args(argv)


# -- a valid file --------------------------------------------------------------------

FULL = """
[gateway]
workers = 2
http_port = 8080
request_timeout = 12.5
log_format = "text"
http_tls = false

[groups.g1]
tokens = ["new", {token = "old", expires = 2030-01-01T00:00:00Z}]
balance = "consistent_hash"
hash_key = "header:x-user"
max_inflight = 10
rate = 50
client_cert_names = ["*.agents.example"]

[[groups.g1.rules]]
upstream = "web"
host = "*.Internal"
timeout = 3

[groups.g1.upstreams.web]
servers = ["http://127.0.0.1:9000/", "http://127.0.0.1:9001"]
balance = "least_conn"
health_path = "/healthz"
max_fails = 5

[groups.g2]
tokens = ["t2"]

[[routes]]
name = "api"
group = "g1"
host = "API.Example.com"
path_prefix = "/api"
strip_prefix = true
methods = ["get", "post"]
rate = 5
burst = 10

[[routes]]
group = "g2"

[[grpc_routes]]
group = "g2"
match_service = "/pkg.Echo"

[upstreams.egress]
servers = ["https://api.github.com"]
balance = "random"

[[forward]]
upstream = "egress"
host = "api.github.com"
"""


def test_a_clients_tunnel_and_the_channels_between_workers_take_their_own_windows(tmp_path):
    from gateway.workers.routing import Routing

    cfg = load_gateway_config(write(tmp_path, FULL))
    # Defaults: a client takes 1 MiB from its WELCOME; channels keep 256 KiB, the window
    # every version gave them, so workers of the old code and the new agree in an upgrade.
    assert (cfg.stream_window, cfg.channel_window, cfg.chunk_size) == (1 << 20, 256 << 10, 128 << 10)

    async def limits():
        routing = Routing(cfg, worker=0, workers=2, spawn=asyncio.ensure_future)
        return routing.stream_limits(), routing.stream_limits(channel=True)

    client, channel = asyncio.run(limits())
    assert (client.window, channel.window) == (cfg.stream_window, cfg.channel_window)
    assert client.body_queue_bytes == cfg.max_queue_bytes // 2
    # chunk_size 0 (the default) is 128 KiB, or the smaller window: a file that set a small
    # window before 128 KiB frames were the default still loads.
    small = load_gateway_config(write(tmp_path, FULL.replace("[gateway]", "[gateway]\nstream_window = 65536"),
                                      name="small.toml"))
    assert (small.stream_window, small.chunk_size) == (65536, 65536)


def test_valid_file_loads(tmp_path):
    path = write(tmp_path, FULL)
    cfg = load_gateway_config(path)
    assert cfg.path == path
    # settings: from the file, else defaults; read as attributes
    assert (cfg.workers, cfg.http_port, cfg.request_timeout, cfg.log_format) == (2, 8080, 12.5, "text")
    assert (cfg.tunnel_port, cfg.chunk_size, cfg.watch_config) == (50001, 131072, True)
    assert set(cfg.settings) == {s.name for s in GATEWAY_SETTINGS}
    with pytest.raises(AttributeError):
        cfg.no_such_setting
    # groups
    g1 = cfg.groups["g1"]
    assert [t.value for t in g1.tokens] == ["new", "old"]
    assert g1.tokens[0].expires is None
    assert g1.tokens[1].expires == datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
    assert g1.tokens[1].valid_at(g1.tokens[1].expires - 1) and not g1.tokens[1].valid_at(g1.tokens[1].expires)
    assert (g1.balance, g1.hash_key, g1.limits.max_inflight, g1.limits.rate) == ("consistent_hash", "header:x-user", 10, 50.0)
    assert g1.client_cert_names == ("*.agents.example",)
    assert cfg.groups["g2"].balance == "round_robin" and cfg.groups["g2"].hash_key == "client_ip"
    (rule,) = g1.client.rules
    assert (rule.target, rule.host, rule.timeout) == ("web", "*.internal", 3.0)
    web = g1.client.upstreams["web"]
    assert web.servers == ("http://127.0.0.1:9000", "http://127.0.0.1:9001")     # trailing / dropped
    assert (web.balance, web.health_path, web.max_fails, web.fail_timeout) == ("least_conn", "/healthz", 5, 10.0)
    # routes
    api, other = cfg.routes
    assert (api.name, api.target, api.host, api.path_prefix, api.strip_prefix) == ("api", "g1", "api.example.com", "/api", True)
    assert api.methods == frozenset({"GET", "POST"}) and api.timeout == 12.5    # the gateway's request_timeout
    assert (api.limits.rate, api.limits.burst) == (5.0, 10.0)
    assert (other.name, other.target, other.path_prefix) == ("routes[1]", "g2", "/")
    assert cfg.grpc_routes[0].service_prefix == "pkg.Echo"
    # egress
    assert cfg.upstreams["egress"].balance == "random"
    assert cfg.forward[0].target == "egress" and cfg.forward[0].host == "api.github.com"


def test_config_pickles(tmp_path):
    cfg = load_gateway_config(write(tmp_path, FULL))
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and back.http_port == 8080


def test_minimal_file_uses_defaults(tmp_path):
    cfg = load_gateway_config(write(tmp_path, ""))
    # chunk_size's default, 0, is resolved at load (128 KiB, or the smaller window).
    assert dict(cfg.settings) == {s.name: s.default for s in GATEWAY_SETTINGS} | {"chunk_size": AUTO_CHUNK}
    assert (cfg.groups, cfg.routes, cfg.forward, cfg.upstreams, cfg.grpc_routes) == ({}, (), (), {}, ())


def test_base_of_the_bad_value_cases_is_valid(tmp_path):
    cfg = load_gateway_config(write(tmp_path, gateway_toml()))
    assert cfg.routes[0].target == "g1" and cfg.forward[0].target == "out"


# -- bad values: ConfigError names the file and the dotted key -----------------------

BAD = {
    # unknown keys
    "unknown gateway key": (dict(gateway="bogus = 1"), "gateway.bogus"),
    "unknown table": (dict(tail="[bogus]\nx = 1"), "bogus"),
    "unknown group key": (dict(group="colour = 'red'"), "groups.g1.colour"),
    "unknown route key": (dict(route="bogus = 1"), "routes[0].bogus"),
    "unknown upstream key": (dict(upstream="weight = 2"), "upstreams.out.weight"),
    "unknown forward key": (dict(tail="bogus = 1"), "forward[0].bogus"),
    # wrong types
    "port as string": (dict(gateway='http_port = "8080"'), "gateway.http_port"),
    "port out of range": (dict(gateway="http_port = 70000"), "gateway.http_port"),
    "timeout as string": (dict(gateway='request_timeout = "30s"'), "gateway.request_timeout"),
    "zero timeout": (dict(gateway="request_timeout = 0"), "gateway.request_timeout"),
    "bool as int": (dict(gateway="http_tls = 1"), "gateway.http_tls"),
    "int as bool": (dict(gateway="chunk_size = true"), "gateway.chunk_size"),
    "negative workers": (dict(gateway="workers = -1"), "gateway.workers"),
    "bad log level": (dict(gateway='log_level = "loud"'), "gateway.log_level"),
    "route timeout as string": (dict(route='timeout = "5"'), "routes[0].timeout"),
    "route methods as string": (dict(route='methods = "GET"'), "routes[0].methods"),
    "route path without slash": (dict(route='path_prefix = "api"'), "routes[0].path_prefix"),
    "route bad wildcard": (dict(route='host = "api.*.com"'), "routes[0].host"),
    "bad hash key": (dict(group='hash_key = "ip"'), "groups.g1.hash_key"),
    "burst without rate": (dict(group="burst = 5"), "groups.g1.burst"),
    "negative route rate": (dict(route="rate = -1"), "routes[0].rate"),
    "max_fails as float": (dict(upstream="max_fails = 1.5"), "upstreams.out.max_fails"),
    "health path without slash": (dict(upstream='health_path = "healthz"'), "upstreams.out.health_path"),
    # cross-setting checks
    "chunk_size > stream_window": (dict(gateway="chunk_size = 300000\nstream_window = 262144"), "gateway.chunk_size"),
    "chunk_size > channel_window": (dict(gateway="chunk_size = 65536\nchannel_window = 32768"), "gateway.chunk_size"),
    "max_batch_bytes too small": (dict(gateway="max_batch_bytes = 1024"), "gateway.max_batch_bytes"),
    "tls_cert missing": (dict(gateway='tls_cert = "/nonexistent/cert.pem"\ntls_key = "/nonexistent/key.pem"'),
                         "gateway.tls_cert"),
    "http_tls without cert": (dict(gateway="http_tls = true"), "gateway.tls_cert"),
    # balance policies
    "bad group balance": (dict(group='balance = "random"'), "groups.g1.balance"),
    "bad upstream balance": (dict(upstream='balance = "least_inflight"'), "upstreams.out.balance"),
}


@pytest.mark.parametrize("parts,key", list(BAD.values()), ids=list(BAD))
def test_bad_value_names_file_and_key(tmp_path, parts, key):
    path = write(tmp_path, gateway_toml(**parts))
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert info.value.file == path and info.value.key == key
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert info.value.message


def replace_in(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


# Cases that change a line of the base file instead of adding one.
EDITS = {
    "route names unknown group": ('[[routes]]\ngroup = "g1"', '[[routes]]\ngroup = "nope"', "routes[0].group"),
    "forward names unknown upstream": ('upstream = "out"', 'upstream = "nope"', "forward[0].upstream"),
    "group rule names unknown upstream": ('upstream = "web"', 'upstream = "nope"', "groups.g1.rules[0].upstream"),
    "upstream ftp url": ('"https://api.example.com"', '"ftp://api.example.com"', "upstreams.out.servers"),
    "upstream url with path": ('"https://api.example.com"', '"https://api.example.com/v1"', "upstreams.out.servers"),
    "upstream url without scheme": ('"https://api.example.com"', '"api.example.com:443"', "upstreams.out.servers"),
    "upstream servers empty": ('["https://api.example.com"]', "[]", "upstreams.out.servers"),
    "upstream servers not strings": ('["https://api.example.com"]', "[443]", "upstreams.out.servers"),
    "group upstream url": ('"http://127.0.0.1:9000"', '"tcp://127.0.0.1:9000"', "groups.g1.upstreams.web.servers"),
    "tokens empty": ('tokens = ["s3cret"]', "tokens = []", "groups.g1.tokens"),
    "token not a string": ('tokens = ["s3cret"]', "tokens = [42]", "groups.g1.tokens[0]"),
    "token expiry not a date": ('tokens = ["s3cret"]', 'tokens = [{token = "a", expires = "tomorrow"}]',
                                "groups.g1.tokens[0].expires"),
    "gateway not a table": ("[gateway]\n", "gateway = 5\n", "gateway"),
}


@pytest.mark.parametrize("old,new,key", list(EDITS.values()), ids=list(EDITS))
def test_bad_edit_names_file_and_key(tmp_path, old, new, key):
    path = write(tmp_path, replace_in(gateway_toml(), old, new))
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert (info.value.file, info.value.key) == (path, key)
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_routes_not_tables(tmp_path):
    path = write(tmp_path, "routes = [1]\n")
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert (info.value.file, info.value.key) == (path, "routes[0]")
    path = write(tmp_path, "routes = 1\n")
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert (info.value.file, info.value.key) == (path, "routes")


@pytest.mark.parametrize("url", ["http://", "https:///"])
def test_upstream_url_without_host_is_refused(tmp_path, url):
    path = write(tmp_path, replace_in(gateway_toml(), '"https://api.example.com"', f'"{url}"'))
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert info.value.key == "upstreams.out.servers"


def test_rule_timeout_boolean_is_refused(tmp_path):
    path = write(tmp_path, gateway_toml(route="timeout = true"))
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert info.value.key == "routes[0].timeout"


def test_invalid_toml_and_missing_file(tmp_path):
    path = write(tmp_path, "[gateway\nhttp_port = 1")
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert info.value.file == path and "not valid TOML" in info.value.message
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError) as info:
        read_toml(missing)
    assert info.value.file == missing and "not found" in info.value.message


# -- precedence: flag > env > file > default -----------------------------------------


@pytest.mark.parametrize("in_file,in_env,flag,expected", [
    (False, False, None, 8001),
    (True, False, None, 1111),
    (True, True, None, 2222),
    (False, True, None, 2222),
    (True, True, 3333, 3333),
    (False, False, 3333, 3333),
])
def test_precedence_flag_env_file_default(tmp_path, monkeypatch, in_file, in_env, flag, expected):
    path = write(tmp_path, "[gateway]\nhttp_port = 1111\n" if in_file else "")
    if in_env:
        monkeypatch.setenv("TUNNEL_GATEWAY_HTTP_PORT", "2222")
    args = parse_flags(["--http-port", str(flag)] if flag is not None else [])
    assert load_gateway_config(path, args).http_port == expected
    without_flags = 2222 if in_env else 1111 if in_file else 8001
    assert load_gateway_config(path).http_port == without_flags


def test_env_and_flags_of_every_type(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNNEL_GATEWAY_WATCH_CONFIG", "off")
    monkeypatch.setenv("TUNNEL_GATEWAY_HEARTBEAT_INTERVAL", "2.5")
    monkeypatch.setenv("TUNNEL_GATEWAY_LOG_LEVEL", "debug")
    monkeypatch.setenv("TUNNEL_GATEWAY_WORKERS", "4")
    path = write(tmp_path, "[gateway]\nworkers = 1\nlog_level = \"error\"\n")
    cfg = load_gateway_config(path)
    assert (cfg.watch_config, cfg.heartbeat_interval, cfg.log_level, cfg.workers) == (False, 2.5, "debug", 4)
    cfg = load_gateway_config(path, parse_flags(["--watch-config", "--workers", "8", "--log-level", "info"]))
    assert (cfg.watch_config, cfg.workers, cfg.log_level, cfg.heartbeat_interval) == (True, 8, "info", 2.5)
    assert load_gateway_config(path, parse_flags(["--no-watch-config"])).watch_config is False


def test_env_can_break_a_cross_setting_check(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNNEL_GATEWAY_STREAM_WINDOW", "1024")
    monkeypatch.setenv("TUNNEL_GATEWAY_CHUNK_SIZE", "2048")
    path = write(tmp_path, "")
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert (info.value.file, info.value.key) == (path, "gateway.chunk_size")


@pytest.mark.parametrize("name,value", [
    ("TUNNEL_GATEWAY_HTTP_PORT", "eighty"),
    ("TUNNEL_GATEWAY_HTTP_PORT", "70000"),
    ("TUNNEL_GATEWAY_REQUEST_TIMEOUT", "soon"),
    ("TUNNEL_GATEWAY_REQUEST_TIMEOUT", "-1"),
    ("TUNNEL_GATEWAY_HTTP_TLS", "maybe"),
    ("TUNNEL_GATEWAY_LOG_FORMAT", "xml"),
])
def test_bad_env_value_names_the_variable(tmp_path, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_gateway_config(write(tmp_path, ""))
    assert (info.value.file, info.value.key) == ("environment", name)


def test_bad_flag_value_names_the_flag(tmp_path):
    args = argparse.Namespace(http_port=70000)
    with pytest.raises(ConfigError) as info:
        load_gateway_config(write(tmp_path, ""), args)
    assert info.value.key == "--http-port"


SETTINGS = (
    Setting("port", 80, port, ""),
    Setting("ratio", 1.5, positive_float, ""),
    Setting("flag", False, boolean, ""),
    Setting("name", "x", string, ""),
)


@pytest.mark.parametrize("environ,expected", [
    ({}, {}),
    ({"P_PORT": "81"}, {"port": 81}),
    ({"P_RATIO": "2"}, {"ratio": 2.0}),
    ({"P_FLAG": "yes"}, {"flag": True}),
    ({"P_FLAG": "ON"}, {"flag": True}),
    ({"P_FLAG": "0"}, {"flag": False}),
    ({"P_NAME": " spaced "}, {"name": " spaced "}),
    ({"OTHER_PORT": "81", "port": "82", "P_port": "83"}, {}),
])
def test_apply_env_pure(environ, expected):
    values = {"port": 80, "ratio": 1.5, "flag": False, "name": "x"}
    out = apply_env(dict(values), SETTINGS, "P_", environ)
    assert out == {**values, **expected}


def test_apply_overrides_skips_unset_flags():
    values = {"port": 80, "ratio": 1.5}
    out = apply_overrides(dict(values), argparse.Namespace(port=None, ratio=3.0), SETTINGS[:2])
    assert out == {"port": 80, "ratio": 3.0}


def test_load_section():
    assert load_section(None, SETTINGS[:2], "f", "s") == {"port": 80, "ratio": 1.5}
    assert load_section({"port": 81}, SETTINGS[:2], "f", "s") == {"port": 81, "ratio": 1.5}
    with pytest.raises(ConfigError) as info:
        load_section({"prot": 81}, SETTINGS[:2], "f", "s")
    assert info.value.key == "s.prot"
    with pytest.raises(ConfigError) as info:
        load_section([], SETTINGS[:2], "f", "s")
    assert info.value.key == "s"


@pytest.mark.parametrize("value,ok", [
    ("127.0.0.1:50001", True), ("gw.example:443", True), ("[::1]:1", True),
    ("nohost", False), (":80", False), ("host:", False), ("host:http", False), ("host:70000", False), (5, False),
])
def test_host_port(value, ok):
    if ok:
        assert host_port(value) == value
    else:
        with pytest.raises(ValueError):
            host_port(value)


# -- group config --------------------------------------------------------------------


def test_group_config_round_trips_through_json():
    table = {
        "rules": [{"name": "api", "upstream": "web", "path_prefix": "/api", "add_headers": {"X-A": "1"}},
                  {"name": "rest", "upstream": "web"}],
        "upstreams": {"web": {"servers": ["http://127.0.0.1:9000"], "balance": "least_conn"}},
    }
    cfg = parse_group_config(table, "gw.toml", "groups.g1")
    back = group_config_from_json(cfg.to_json(), "gateway")
    assert back.rules == cfg.rules and back.upstreams == cfg.upstreams
    assert back.version == cfg.version and len(cfg.version) == 12
    reordered = {"upstreams": {"web": {"balance": "least_conn", "servers": ["http://127.0.0.1:9000"]}},
                 "rules": [dict(reversed(r.items())) for r in table["rules"]]}
    assert parse_group_config(reordered, "x", "y").version == cfg.version       # key order does not count
    changed = {**table, "rules": table["rules"][:1]}
    assert parse_group_config(changed, "x", "y").version != cfg.version


@pytest.mark.parametrize("raw,key", [
    (b"{not json", "-"),
    (b"[1, 2]", "-"),
    (b'{"upstreams": {"u": {"servers": ["ftp://x"]}}}', "group.upstreams.u.servers"),
    (b'{"rules": [{"upstream": "nope"}]}', "group.rules[0].upstream"),
])
def test_group_config_from_bad_json(raw, key):
    with pytest.raises(ConfigError) as info:
        group_config_from_json(raw, "gateway welcome")
    assert (info.value.file, info.value.key) == ("gateway welcome", key)


def test_upstream_pool_follows_the_config():
    (up,) = parse_upstreams({"u": {"servers": ["http://a:1", "http://b:2/"], "balance": "least_conn",
                                   "max_fails": 1, "fail_timeout": 2}}, "f", "upstreams").values()
    pool = up.pool()
    assert pool.servers == ("http://a:1", "http://b:2") and pool.policy == "least_conn"
    assert (pool.max_fails, pool.fail_timeout) == (1, 2.0)


def test_upstream_health_interval_must_be_positive_with_health_path():
    with pytest.raises(ConfigError) as info:
        parse_upstreams({"u": {"servers": ["http://a:1"], "health_path": "/h", "health_interval": 0}}, "f", "ups")
    assert info.value.key == "ups.u.health_interval"
    assert parse_upstreams({"u": {"servers": ["http://a:1"], "health_interval": 0}}, "f", "ups")["u"].health_interval == 0


# -- client config -------------------------------------------------------------------

CLIENT = """
[client]
server = "gw.example:50001"
group = "g1"
token = "s3cret"
client_id = "c1"
connections = 3
"""


def test_client_config_loads(tmp_path):
    path = write(tmp_path, CLIENT, "client.toml")
    cfg = load_client_config(path)
    assert cfg.path == path
    assert (cfg.server, cfg.group, cfg.token, cfg.client_id, cfg.connections) == ("gw.example:50001", "g1", "s3cret", "c1", 3)
    assert cfg.local_port == 7001 and set(cfg.settings) == {s.name for s in CLIENT_SETTINGS}


def test_client_id_defaults_to_host_and_pid(tmp_path):
    path = write(tmp_path, CLIENT.replace('client_id = "c1"\n', ""), "client.toml")
    assert load_client_config(path).client_id == f"{socket.gethostname()}-{os.getpid()}"


def test_client_from_env_and_flags_only(monkeypatch):
    monkeypatch.setenv("TUNNEL_CLIENT_GROUP", "g-env")
    monkeypatch.setenv("TUNNEL_CLIENT_TOKEN", "t-env")
    monkeypatch.setenv("TUNNEL_CLIENT_CONNECTIONS", "4")
    cfg = load_client_config(None)
    assert (cfg.path, cfg.group, cfg.token, cfg.connections) == ("defaults", "g-env", "t-env", 4)
    cfg = load_client_config(None, parse_flags(["--group", "g-flag", "--tls"], CLIENT_SETTINGS, CLIENT_ENV))
    assert (cfg.group, cfg.token, cfg.tls) == ("g-flag", "t-env", True)


def test_client_precedence(tmp_path, monkeypatch):
    path = write(tmp_path, CLIENT, "client.toml")
    monkeypatch.setenv("TUNNEL_CLIENT_CONNECTIONS", "5")
    assert load_client_config(path).connections == 5
    assert load_client_config(path, parse_flags(["--connections", "6"], CLIENT_SETTINGS, CLIENT_ENV)).connections == 6
    monkeypatch.delenv("TUNNEL_CLIENT_CONNECTIONS")
    assert load_client_config(path).connections == 3


@pytest.mark.parametrize("old,new,key", [
    ('group = "g1"\n', "", "client.group"),
    ('token = "s3cret"\n', 'token = ""\n', "client.token"),
    ('server = "gw.example:50001"', 'server = "gw.example"', "client.server"),
    ("connections = 3", "connections = 0", "client.connections"),
    ("connections = 3", "connections = 3\nbogus = 1", "client.bogus"),
    ("[client]", "[gateway]\n[client]", "gateway"),
])
def test_client_bad_values(tmp_path, old, new, key):
    path = write(tmp_path, replace_in(CLIENT, old, new), "client.toml")
    with pytest.raises(ConfigError) as info:
        load_client_config(path)
    assert (info.value.file, info.value.key) == (path, key)
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_client_without_group_anywhere():
    with pytest.raises(ConfigError) as info:
        load_client_config(None)
    assert (info.value.file, info.value.key) == ("defaults", "client.group")


# -- grpc_event_engine: gRPC's I/O engine, by GRPC_EXPERIMENTS (gateway/grpc_io.py) -----


def test_grpc_io_defaults_to_iomgr_and_keeps_other_experiments():
    env = {"GRPC_EXPERIMENTS": "tcp_rcv_lowat"}
    value = choose_grpc_io(False, env)
    assert value == "tcp_rcv_lowat,-event_engine_client,-event_engine_listener"
    assert env["GRPC_EXPERIMENTS"] == value
    assert grpc_io_in_use(env) == "iomgr"
    assert choose_grpc_io(False, env) == value  # applying twice changes nothing


def test_grpc_io_event_engine_leaves_the_environment_alone():
    env: dict[str, str] = {}
    assert choose_grpc_io(True, env) == ""
    assert env == {}
    assert grpc_io_in_use(env) == "event_engine"


def test_grpc_io_an_experiment_the_user_names_is_theirs():
    env = {"GRPC_EXPERIMENTS": "event_engine_client"}
    assert choose_grpc_io(False, env) == "event_engine_client,-event_engine_listener"
    assert grpc_io_in_use(env) == "event_engine"  # the user kept EventEngine for clients


# -- trusted_proxies: whose X-Forwarded-* are kept, in both programs ----------------------


def test_trusted_proxies_load_from_file_env_and_flag(tmp_path, monkeypatch):
    path = write(tmp_path, gateway_toml(gateway='trusted_proxies = ["10.0.0.0/8", "127.0.0.1"]'))
    assert load_gateway_config(path).trusted_proxies == ("10.0.0.0/8", "127.0.0.1/32")
    assert load_gateway_config(write(tmp_path, gateway_toml(), "plain.toml")).trusted_proxies == ()
    args = parse_flags(["--trusted-proxies", "192.0.2.0/24,::1"])
    assert load_gateway_config(path, args).trusted_proxies == ("192.0.2.0/24", "::1/128")
    monkeypatch.setenv("TUNNEL_CLIENT_GROUP", "g")
    monkeypatch.setenv("TUNNEL_CLIENT_TOKEN", "t")
    monkeypatch.setenv("TUNNEL_CLIENT_TRUSTED_PROXIES", "127.0.0.0/8")
    assert load_client_config(None).trusted_proxies == ("127.0.0.0/8",)


@pytest.mark.parametrize("value", ['["10.0.0.300"]', '["proxy.example"]', '"1.2.3.4/40"', "5", "[1]"])
def test_a_bad_trusted_proxy_names_the_key(tmp_path, value):
    path = write(tmp_path, gateway_toml(gateway=f"trusted_proxies = {value}"))
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert info.value.key == "gateway.trusted_proxies"
    cpath = write(tmp_path, f'[client]\ngroup = "g"\ntoken = "t"\ntrusted_proxies = {value}\n', "client.toml")
    with pytest.raises(ConfigError) as info:
        load_client_config(cpath)
    assert info.value.key == "client.trusted_proxies"
