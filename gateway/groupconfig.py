"""A group's client config (rules and upstreams), sent by the gateway to its
clients in WELCOME and CONFIG, and the gateway's own upstreams. Pure logic."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

import orjson

from gateway.balance import UPSTREAM_POLICIES, ServerPool
from gateway.rules import Rule, parse_rules
from gateway.settings import ConfigError, Errors, unknown_keys

__all__ = ["Upstream", "GroupConfig", "parse_upstreams", "parse_group_config", "group_config_from_json",
           "check_allowed"]


@dataclass(frozen=True)
class Upstream:
    name: str
    servers: tuple[str, ...]
    balance: str = "round_robin"
    health_path: str = ""        # active check: GET server + path; "" for passive only
    health_interval: float = 5.0
    max_fails: int = 3           # passive: failures in a row that take a server out
    fail_timeout: float = 10.0   # ... for this long

    def pool(self) -> ServerPool:
        return ServerPool(self.servers, self.balance, max_fails=self.max_fails, fail_timeout=self.fail_timeout)


def parse_upstreams(raw: Any, file: str, key: str) -> dict[str, Upstream]:
    """The upstreams of a table; every error found is raised together (one ConfigError)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(file, key, f"must be a table of upstreams, got {type(raw).__name__}")
    errors = Errors()
    out = {}
    for name, table in raw.items():
        up = errors.check(_parse_upstream, name, table, file, f"{key}.{name}")
        if up is not None:
            out[name] = up
    errors.raise_any()
    return out


_UPSTREAM_KEYS = ("servers", "balance", "health_path", "health_interval", "max_fails", "fail_timeout")


def _parse_upstream(name: str, table: Any, file: str, k: str) -> Upstream:
    if not isinstance(table, dict):
        raise ConfigError(file, k, f"must be a table, got {table!r}")
    errors = Errors()
    for exc in unknown_keys(table, _UPSTREAM_KEYS, file, k):
        errors.add(exc)
    servers = table.get("servers")
    if not isinstance(servers, list) or not servers or not all(isinstance(s, str) for s in servers):
        errors.add(ConfigError(file, f"{k}.servers", f"must be a non-empty list of URLs, got {servers!r}"))
        servers = []
    for s in servers:
        scheme, sep, host = s.rstrip("/").partition("://")
        if scheme not in ("http", "https") or not sep or not host or "/" in host:
            errors.add(ConfigError(file, f"{k}.servers", f"{s!r} must be a base URL like http://host:port"))
    balance = table.get("balance", "round_robin")
    if balance not in UPSTREAM_POLICIES:
        errors.add(ConfigError(file, f"{k}.balance", f"must be one of {', '.join(UPSTREAM_POLICIES)}, got {balance!r}"))
    health_path = table.get("health_path", "")
    if not isinstance(health_path, str) or (health_path and not health_path.startswith("/")):
        errors.add(ConfigError(file, f"{k}.health_path", f"must be a path starting with /, got {health_path!r}"))
    numbers = {}
    for key_name, default, kind in (("health_interval", 5.0, float), ("fail_timeout", 10.0, float),
                                    ("max_fails", 3, int)):
        v = table.get(key_name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (kind is int and not isinstance(v, int)):
            errors.add(ConfigError(file, f"{k}.{key_name}",
                                   f"must be a non-negative {'integer' if kind is int else 'number'}, got {v!r}"))
            v = default
        numbers[key_name] = kind(v)
    if health_path and numbers["health_interval"] <= 0:
        errors.add(ConfigError(file, f"{k}.health_interval", "must be positive when health_path is set"))
    errors.raise_any()
    return Upstream(name, tuple(s.rstrip("/") for s in servers), balance, health_path, **numbers)


@dataclass(frozen=True)
class GroupConfig:
    """What a client of the group needs: its rules and upstreams."""

    rules: tuple[Rule, ...]
    upstreams: Mapping[str, Upstream]
    raw: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(self.raw, option=orjson.OPT_SORT_KEYS)

    @property
    def version(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()[:12]


def parse_group_config(table: Mapping[str, Any], file: str, key: str) -> GroupConfig:
    errors = Errors()
    upstreams = errors.check(parse_upstreams, table.get("upstreams"), file, f"{key}.upstreams", default=None)
    if upstreams is None:  # its rules' targets are checked against the names it has
        raw_ups = table.get("upstreams")
        upstreams = {n: None for n in raw_ups} if isinstance(raw_ups, dict) else {}
    rules = errors.check(parse_rules, table.get("rules"), file, f"{key}.rules", "upstream", upstreams, default=())
    errors.raise_any()
    raw = {"rules": table.get("rules", []), "upstreams": table.get("upstreams", {})}
    return GroupConfig(rules, upstreams, raw)


def group_config_from_json(raw: bytes, source: str) -> GroupConfig:
    try:
        table = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(source, "-", f"not valid JSON: {exc}") from None
    if not isinstance(table, dict):
        raise ConfigError(source, "-", "must be an object")
    return parse_group_config(table, source, "group")


def check_allowed(upstreams: Mapping[str, Upstream], patterns: tuple[str, ...], source: str) -> None:
    """Raise ConfigError naming the first upstream server outside `patterns` (host:port,
    `*` wildcards; a URL without a port has its scheme's); none given: any is allowed."""
    if not patterns:
        return
    # Only * is special (fnmatch's [...] would make an IPv6 pattern [::1]:80 a character class).
    globs = [re.compile(".*".join(re.escape(part) for part in p.lower().split("*"))) for p in patterns]
    for name, up in upstreams.items():
        for server in up.servers:
            address = _address(server)
            if address is None or not any(g.fullmatch(address) for g in globs):
                raise ConfigError(source, f"upstreams.{name}.servers",
                                  f"{server} is not allowed by this client's allow_upstreams ({', '.join(patterns)})")


def _address(server: str) -> str | None:
    """host:port a server URL connects to, read as the upstream client reads it (urlsplit:
    http://a:80@b connects to b), IPv6 in brackets; None when it names no host."""
    try:
        parts = urlsplit(server)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    host = parts.hostname
    if not host or parts.username is not None or parts.query or parts.fragment:
        return None  # userinfo, ?... or #... in a server URL: nothing to allow
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
