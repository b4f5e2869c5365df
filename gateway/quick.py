"""Quick tunnels: `tunnel-client http PORT` asks for a public name and the gateway
makes a route `NAME.<domain>` -> that client on the fly, for as long as the client
is connected. Pure logic: the `[quick]` table, names, public URLs, and the group a
quick tunnel routes by (`quick.NAME`: its streams are that group's, so choosing a
stream, limits, logs, metrics and the fleet work as for configured groups).

A name is one DNS label, lower case. Configured routes win: a quick tunnel only
gets requests no configured route matches, and a name whose host a configured
route would take is refused.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping
from urllib.parse import urlsplit

from gateway.groupconfig import GroupConfig, parse_group_config
from gateway.limits import LIMIT_KEYS, Limits, parse_limits
from gateway.settings import ConfigError

if TYPE_CHECKING:
    from gateway.config import GroupSpec, Token

__all__ = ["QUICK_PREFIX", "DEFAULT_PUBLIC_URL", "QuickConfig", "parse_quick", "valid_name", "random_name",
           "group_of", "name_of_group", "label_of"]

QUICK_PREFIX = "quick."
DEFAULT_PUBLIC_URL = "http://{name}.localhost:{http_port}"
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_KEYS = {"tokens", "domain", "public_url", "max_tunnels", "timeout"} | LIMIT_KEYS
# Names a random pick uses: easy to read out and type (no 0/o, 1/l).
_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


def valid_name(name: str) -> bool:
    """One DNS label, lower case: letters, digits and inner hyphens, at most 63."""
    return bool(_LABEL.fullmatch(name))


def random_name() -> str:
    """A fresh name: 10 characters, a letter first (about 50 bits: not guessable)."""
    return secrets.choice(_ALPHABET[:24]) + "".join(secrets.choice(_ALPHABET) for _ in range(9))


def group_of(name: str) -> str:
    return QUICK_PREFIX + name


def name_of_group(group: str) -> str | None:
    return group[len(QUICK_PREFIX):] if group.startswith(QUICK_PREFIX) else None


def label_of(group: str) -> str:
    """A group as metrics and graphs name it: every quick tunnel as "quick" (names come and
    go: one series each would grow without bound)."""
    return "quick" if group.startswith(QUICK_PREFIX) else group


@dataclass(frozen=True)
class QuickConfig:
    """Quick tunnels allowed: who may open one (`tokens`), where they appear
    (`public_url`, a template with `{name}` and optionally `{http_port}`), how many
    a gateway holds, and the limits and timeout of each one's route."""

    tokens: tuple["Token", ...]
    public_url: str = DEFAULT_PUBLIC_URL
    max_tunnels: int = 100
    timeout: float = 30.0
    limits: Limits = Limits()
    _specs: dict[str, "GroupSpec"] = field(default_factory=dict, compare=False, repr=False)

    @property
    def host_suffix(self) -> str:
        """What follows the name in a quick tunnel's host (".localhost")."""
        host = urlsplit(self.public_url.replace("{name}", "name").replace("{http_port}", "1")).hostname or ""
        return host[len("name"):]

    def url(self, name: str, http_port: int) -> str:
        return self.public_url.replace("{name}", name).replace("{http_port}", str(http_port))

    def host(self, name: str) -> str:
        return name + self.host_suffix

    def name_of(self, host: str) -> str | None:
        """The quick name a request's host (port stripped, lower case) names, if any."""
        suffix = self.host_suffix
        if not host.endswith(suffix):
            return None
        name = host[: len(host) - len(suffix)]
        return name if valid_name(name) else None

    def spec(self, name: str) -> "GroupSpec":
        """The group a quick tunnel's requests route by (kept: the entries plan by it)."""
        spec = self._specs.get(name)
        if spec is None:
            from gateway.config import GroupSpec  # here: gateway.config imports this module

            if len(self._specs) > 4 * self.max_tunnels:  # names come and go: keep the memo bounded
                self._specs.clear()
            spec = self._specs[name] = GroupSpec(group_of(name), self.tokens, "round_robin", GroupConfig((), {}),
                                                 limits=self.limits)
        return spec


def client_config(upstream: str, where: str) -> GroupConfig:
    """What a quick tunnel's client is told: everything to the upstream it named
    (`http://127.0.0.1:3000`); raises ConfigError when that is no base URL."""
    return parse_group_config({"rules": [{"path_prefix": "/", "upstream": "local"}],
                               "upstreams": {"local": {"servers": [upstream]}}}, where, "quick")


def parse_quick(raw: Any, file: str, *, request_timeout: float,
                parse_tokens: Callable[[Any, str, str], tuple["Token", ...]],
                overrides: Mapping[str, Any] | None = None) -> QuickConfig | None:
    """The `[quick]` table (None: no quick tunnels). `overrides`: the --domain and
    --public-url flags, over the file."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(file, "quick", "must be a table")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(file, f"quick.{sorted(unknown)[0]}", "unknown key")
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v}}
    public_url = raw.get("public_url") or (f"http://{{name}}.{raw['domain']}" if raw.get("domain")
                                           else DEFAULT_PUBLIC_URL)
    domain = raw.get("domain", "")
    if not isinstance(domain, str) or (domain and not all(valid_name(p) for p in domain.lower().split("."))):
        raise ConfigError(file, "quick.domain", f"{domain!r} must be a domain name like tunnel.example.com")
    if not isinstance(public_url, str) or public_url.count("{name}") != 1:
        raise ConfigError(file, "quick.public_url", f"{public_url!r} must hold {{name}} once")
    parts = urlsplit(public_url.replace("{name}", "name").replace("{http_port}", "1"))
    if parts.scheme not in ("http", "https") or not (parts.hostname or "").startswith("name."):
        raise ConfigError(file, "quick.public_url",
                          f"{public_url!r} must be like http://{{name}}.example.com (the name first in the host)")
    max_tunnels = raw.get("max_tunnels", 100)
    if isinstance(max_tunnels, bool) or not isinstance(max_tunnels, int) or max_tunnels <= 0:
        raise ConfigError(file, "quick.max_tunnels", f"{max_tunnels!r} must be a positive integer")
    timeout = raw.get("timeout", request_timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(file, "quick.timeout", f"{timeout!r} must be a positive number of seconds")
    return QuickConfig(parse_tokens(raw.get("tokens"), file, "quick.tokens"), public_url.lower(), max_tunnels,
                       float(timeout), parse_limits(raw, file, "quick"))
