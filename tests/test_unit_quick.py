"""Quick tunnels' pure parts (gateway/quick.py): names, public URLs and hosts, the
[quick] table's checks, the group a quick tunnel routes by, its client's config."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from gateway.config import _parse_tokens
from gateway.quick import (DEFAULT_PUBLIC_URL, QuickConfig, client_config, group_of, name_of_group, parse_quick,
                           random_name, valid_name)
from gateway.settings import ConfigError
from gateway.workers.quick_tunnels import settle_quick
from tests.test_unit_fleet import routing_with


def parse(raw, **overrides) -> QuickConfig | None:
    return parse_quick(raw, "gw.toml", request_timeout=30.0, parse_tokens=_parse_tokens, overrides=overrides)


def test_names_are_one_lower_case_dns_label():
    for good in ("a", "demo", "my-app-2", "x" * 63, "0day"):
        assert valid_name(good), good
    for bad in ("", "-a", "a-", "A", "a.b", "a_b", "x" * 64, "é", "a b", "demo\n"):
        assert not valid_name(bad), bad
    names = {random_name() for _ in range(200)}
    assert len(names) == 200 and all(valid_name(n) and n[0].isalpha() and len(n) == 10 for n in names)
    assert name_of_group(group_of("demo")) == "demo" and name_of_group("g1") is None


def test_public_url_host_and_names_of_hosts():
    q = parse({"tokens": ["t"]})
    assert q.public_url == DEFAULT_PUBLIC_URL and q.max_tunnels == 100 and q.timeout == 30.0
    assert q.url("demo", 8001) == "http://demo.localhost:8001" and q.host("demo") == "demo.localhost"
    assert q.name_of("demo.localhost") == "demo"
    for host in ("localhost", "a.b.localhost", "demo.localhost.evil", "-x.localhost", "demo.example.com"):
        assert q.name_of(host) is None, host
    on_domain = parse({"tokens": ["t"], "domain": "tunnel.example.com"})
    assert on_domain.url("demo", 8001) == "http://demo.tunnel.example.com"
    assert on_domain.name_of("demo.tunnel.example.com") == "demo"
    flag = parse({"tokens": ["t"], "domain": "file.example"}, domain="flag.example")  # the flag wins
    assert flag.url("x", 80) == "http://x.flag.example"
    given = parse({"tokens": ["t"]}, public_url="https://{name}.t.example:8443")
    assert given.url("x", 80) == "https://x.t.example:8443" and given.name_of("x.t.example") == "x"


@pytest.mark.parametrize("raw,key", [
    ("yes", "quick"),
    ({"tokens": ["t"], "color": 1}, "quick.color"),
    ({}, "quick.tokens"),
    ({"tokens": ["t"], "domain": "bad_domain"}, "quick.domain"),
    ({"tokens": ["t"], "public_url": "http://example.com"}, "quick.public_url"),
    ({"tokens": ["t"], "public_url": "ftp://{name}.example.com"}, "quick.public_url"),
    ({"tokens": ["t"], "public_url": "http://x.{name}.example.com"}, "quick.public_url"),
    ({"tokens": ["t"], "max_tunnels": 0}, "quick.max_tunnels"),
    ({"tokens": ["t"], "timeout": True}, "quick.timeout"),
    ({"tokens": ["t"], "rate": -1}, "quick.rate"),
])
def test_bad_tables_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        parse(raw)
    assert err.value.key == key and err.value.file == "gw.toml"


def test_no_table_no_quick_tunnels_and_the_spec_of_a_name():
    assert parse(None) is None
    q = parse({"tokens": ["t1", "t2"], "max_inflight": 5, "timeout": 3})
    spec = q.spec("demo")
    assert spec.name == "quick.demo" and [t.value for t in spec.tokens] == ["t1", "t2"]
    assert spec.limits.max_inflight == 5 and q.timeout == 3.0 and q.spec("demo") is spec
    cfg = client_config("http://127.0.0.1:3000", "HELLO")
    assert [r.target for r in cfg.rules] == ["local"] and cfg.upstreams["local"].servers == ("http://127.0.0.1:3000",)
    for bad in ("127.0.0.1:3000", "ftp://x:1", "http://x:1/path"):
        with pytest.raises(ConfigError):
            client_config(bad, "HELLO")


def test_two_processes_admitted_to_one_name_at_once_the_later_goes(tmp_path):
    """settle_quick: once the other workers' and nodes' rows arrived, the later of two
    processes holding one quick name (connection time, then instance) gets GOAWAY name_taken."""
    sent: list[str] = []

    class Stream(SimpleNamespace):
        async def goaway(self, reason: str, grace: float) -> None:
            sent.append(f"{self.peer_id}:{reason}")

    def remote(instance: str, at: float) -> dict:
        return {"b/w1": {"node": "b", "worker": 1, "node_state": "serving", "clients": [
            {"client_id": "x", "group": "quick.demo", "connection": "x/0", "inflight": 0, "draining": False,
             "unhealthy": [], "connected_at": at, "instance": instance}]}}

    def stream(at: float, instance: str = "mine") -> Stream:
        return Stream(peer_id="me", group="quick.demo", connected_at=at, instance=instance, closed=False, draining=False)

    def settle(routing, s) -> None:
        routing.spawn = lambda coro: asyncio.run(coro)
        settle_quick(routing, s)

    settle(routing_with(tmp_path, remote("other", 10.0)), stream(11.0))
    assert sent == ["me:name_taken"]  # the other was first
    settle(routing_with(tmp_path, remote("other", 12.0)), stream(11.0))
    settle(routing_with(tmp_path, remote("mine", 5.0)), stream(11.0))  # its own older stream: a move
    assert sent == ["me:name_taken"]
