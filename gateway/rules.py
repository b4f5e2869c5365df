"""Request matching rules: first match wins. Pure logic, no I/O.

One `Rule` shape serves the gateway's routes (target: a client group), the
gateway's forward rules (target: a gateway upstream) and a group's client
rules (target: an upstream of the client).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from gateway.limits import LIMIT_KEYS, Limits, parse_limits
from gateway.settings import ConfigError, Errors, unknown_keys

__all__ = ["Rule", "first_match", "parse_rules", "host_matches", "path_matches"]


def host_matches(pattern: str, host: str) -> bool:
    """`pattern` is empty or `*` (any), exact, or `*.suffix` (any subdomain)."""
    if not pattern or pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def path_matches(prefix: str, path: str) -> bool:
    """Segment-aware prefix: `/api` matches `/api` and `/api/x`, not `/apix`."""
    if prefix in ("", "/"):
        return True
    if not path.startswith(prefix):
        return False
    return prefix.endswith("/") or len(path) == len(prefix) or path[len(prefix)] in "/?"


def strip_port(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    colon = host.rfind(":")
    return host[:colon] if colon >= 0 else host


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    target: str
    host: str = ""
    path_prefix: str = "/"
    methods: frozenset[str] = frozenset()
    headers: tuple[tuple[str, str], ...] = ()
    set_host: str = ""
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: frozenset[str] = frozenset()
    strip_prefix: bool = False
    timeout: float = 30.0
    idle_timeout: float = 0.0  # 0: the global stream_idle_timeout
    service_prefix: str = ""   # gRPC routes: the service name starts with this
    retry: bool = False  # routes: retry a request whose tunnel is lost, though not idempotent
    limits: Limits = Limits()

    def matches(self, host: str, path: str, method: str, headers: Mapping[str, str]) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.service_prefix and not path.startswith(self.service_prefix, 1):
            return False
        if not host_matches(self.host, host):
            return False
        if not path_matches(self.path_prefix, path):
            return False
        for name, value in self.headers:
            if headers.get(name) != value:
                return False
        return True

    def rewrite_path(self, path: str) -> str:
        if not self.strip_prefix or self.path_prefix in ("", "/"):
            return path
        rest = path[len(self.path_prefix.rstrip("/")) :]
        return rest if rest.startswith("/") else "/" + rest


def first_match(rules: Sequence[Rule], host: str, path: str, method: str, headers: Mapping[str, str]) -> Rule | None:
    host = strip_port(host)
    for rule in rules:
        if rule.matches(host, path, method, headers):
            return rule
    return None


_RULE_KEYS = {
    "name", "host", "path_prefix", "methods", "headers", "set_host",
    "add_headers", "remove_headers", "strip_prefix", "timeout", "idle_timeout", "match_service",
} | LIMIT_KEYS


def _positive(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(where, key, f"must be a non-negative number of seconds, got {value!r}")
    return float(value)


def _str(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(where, key, f"must be a string, got {type(value).__name__} {value!r}")
    return value


def _str_map(where: str, key: str, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(where, key, f"must be a table of strings, got {value!r}")
    return tuple((k.lower(), v) for k, v in value.items())


def _str_list(where: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(where, key, f"must be a list of strings, got {value!r}")
    return value


def _target(where: str, key: str, value: Any, target_key: str, known: set[str]) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(where, key, "is required")
    if value not in known:
        raise ConfigError(where, key, f"names unknown {target_key} {value!r}")
    return value


def _prefix(where: str, key: str, value: Any) -> str:
    prefix = _str(where, key, value)
    if not prefix.startswith("/"):
        raise ConfigError(where, key, f"must start with /, got {prefix!r}")
    return prefix


def _host(where: str, key: str, value: Any) -> str:
    host = _str(where, key, value).lower()
    if "*" in host and host != "*" and not (host.startswith("*.") and "*" not in host[1:]):
        raise ConfigError(where, key, f"wildcards are only allowed as a leading '*.', got {host!r}")
    return host


def _timeout(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(where, key, f"must be a positive number of seconds, got {value!r}")
    return float(value)


def _flag(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(where, key, f"must be true or false, got {value!r}")
    return value


def parse_rules(
    raw: Any, where: str, key: str, target_key: str, targets: Iterable[str], default_timeout: float = 30.0,
    *, retry: bool = False,
) -> tuple[Rule, ...]:
    """Validate a TOML array of rule tables; errors name the file and key, and all
    of them are raised together (one ConfigError carrying the others).
    `retry`: the rules may say `retry = true` (the HTTP routes)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(where, key, f"must be an array of tables ([[{key}]]), got {type(raw).__name__}")
    known = set(targets)
    errors = Errors()
    rules = []
    for i, item in enumerate(raw):
        rule = errors.check(_parse_rule, item, where, key, i, target_key, known, default_timeout, retry)
        if rule is not None:
            rules.append(rule)
    errors.raise_any()
    return tuple(rules)


def _parse_rule(item: Any, where: str, key: str, i: int, target_key: str, known: set[str],
                default_timeout: float, retry: bool) -> Rule:
    k = f"{key}[{i}]"
    if not isinstance(item, dict):
        raise ConfigError(where, k, f"must be a table, got {item!r}")
    errors = Errors()
    for exc in unknown_keys(item, sorted(_RULE_KEYS | {target_key} | ({"retry"} if retry else set())), where, k):
        errors.add(exc)

    def get(name: str, check: Any, default: Any, *more: Any) -> Any:
        return errors.check(check, where, f"{k}.{name}", item.get(name, default), *more, default=default)

    target = get(target_key, _target, "", target_key, known)
    rule = dict(
        name=get("name", _str, f"{key}[{i}]"),
        host=get("host", _host, ""),
        path_prefix=get("path_prefix", _prefix, "/"),
        methods=frozenset(m.upper() for m in get("methods", _str_list, [])),
        headers=get("headers", _str_map, {}),
        set_host=get("set_host", _str, ""),
        add_headers=get("add_headers", _str_map, {}),
        remove_headers=frozenset(h.lower() for h in get("remove_headers", _str_list, [])),
        strip_prefix=get("strip_prefix", _flag, False),
        timeout=get("timeout", _timeout, default_timeout),
        idle_timeout=get("idle_timeout", _positive, 0.0),
        service_prefix=get("match_service", _str, "").lstrip("/"),
        limits=errors.check(parse_limits, item, where, k, default=Limits()),
        retry=get("retry", _flag, False),
    )
    errors.raise_any()
    return Rule(target=target, **rule)
