"""The fleet's settings: the `[gateway]` keys that make a gateway one node of
several (`cluster` and the rest), their checks, and what the router process
needs of them. Pure logic, no I/O (the host name aside): the supervisor's
process loads this before it spawns anyone.

Without `cluster` none of this takes effect: a gateway is one host, as before,
and needs no Redis."""
from __future__ import annotations

import ipaddress
import re
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any, Mapping

from gateway.ports import is_wildcard
from gateway.settings import ConfigError, Setting, port, positive_float

__all__ = ["CLUSTER_SETTINGS", "ClusterSettings", "check_cluster", "cluster_settings", "NODE_ID"]

# A node id is one token: it names Redis keys and prefixes remote worker
# identities ("NODE/wI"), so it never holds a "/".
NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def cluster_url(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    if not v:
        return v
    parts = urllib.parse.urlsplit(v)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("must be a redis:// or rediss:// URL (redis://host:6379/0), or empty for one host")
    return v


def node_id(v: Any) -> str:
    if not isinstance(v, str) or (v and not NODE_ID.fullmatch(v)):
        raise ValueError("must be one token of letters, digits, '.', '_' or '-' (at most 64), without '/'")
    return v


def key_prefix(v: Any) -> str:
    if not isinstance(v, str) or not v or any(c.isspace() for c in v):
        raise ValueError("must be a non-empty string without spaces")
    return v


def host_name(v: Any) -> str:
    if not isinstance(v, str) or any(c.isspace() or c in "/[]@" for c in v):
        raise ValueError("must be an address or a host name (no scheme, no port)")
    if ":" in v:  # only an IPv6 address may hold one
        try:
            ipaddress.IPv6Address(v)
        except ValueError:
            raise ValueError("must be an address or a host name (no scheme, no port)") from None
    return v


CLUSTER_SETTINGS: tuple[Setting, ...] = (
    Setting("cluster", "", cluster_url,
            "Redis URL of the fleet's registry (redis:// or rediss://, a password in it is never logged); "
            "empty: this gateway is one host"),
    Setting("cluster_prefix", "tunnel", key_prefix,
            "prefix of the fleet's Redis keys (fleets sharing a Redis keep apart by it)"),
    Setting("node_id", "", node_id, "this node's id in the fleet (empty: the host name)"),
    Setting("peer_port", 7100, port, "port (on host) where other nodes' routers reach this node's (with cluster)"),
    Setting("advertise_host", "", host_name,
            "the address other nodes and clients dial for this node (empty: host; required when host is a wildcard)"),
    Setting("node_ttl", 5.0, positive_float,
            "seconds a node's registry lease lasts: a node that stops renewing leaves the fleet within 1.5x this"),
)


@dataclass(frozen=True)
class ClusterSettings:
    """What the router process needs to be this node of the fleet (picklable)."""

    url: str
    prefix: str
    node_id: str
    node_ttl: float
    peer: str    # tcp://advertise_host:peer_port: what other nodes' routers dial
    tunnel: str  # advertise_host:tunnel_port: what clients dial
    bind: str    # tcp://host:peer_port: where this node's router listens for them


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def check_cluster(settings: dict[str, Any], path: str) -> None:
    """With `cluster` set: fill in node_id (the host name) and advertise_host
    (host), and refuse what cannot work, naming the key. Without it: nothing."""
    if not settings["cluster"]:
        return
    if not settings["node_id"]:
        name = socket.gethostname()
        if not NODE_ID.fullmatch(name):
            raise ConfigError(path, "gateway.node_id", f"the host name {name!r} is not a valid node id: set node_id")
        settings["node_id"] = name
    if not settings["peer_port"]:
        raise ConfigError(path, "gateway.peer_port", "must be set (not 0) with cluster")
    if not settings["advertise_host"]:
        if is_wildcard(settings["host"]):
            raise ConfigError(path, "gateway.advertise_host",
                              f"is required with cluster when host ({settings['host'] or '*'}) is a wildcard: "
                              "the address other nodes and clients dial for this node")
        settings["advertise_host"] = settings["host"]
    if is_wildcard(settings["advertise_host"]):
        raise ConfigError(path, "gateway.advertise_host", "must be an address other nodes can dial, not a wildcard")


def cluster_settings(settings: Mapping[str, Any]) -> ClusterSettings | None:
    """The router's part of a checked config (`check_cluster`); None for one host."""
    if not settings.get("cluster"):
        return None
    advertised = _bracketed(settings["advertise_host"])
    bind_host = "*" if is_wildcard(settings["host"]) else _bracketed(settings["host"])
    return ClusterSettings(
        url=settings["cluster"], prefix=settings["cluster_prefix"], node_id=settings["node_id"],
        node_ttl=settings["node_ttl"], peer=f"tcp://{advertised}:{settings['peer_port']}",
        tunnel=f"{advertised}:{settings['tunnel_port']}", bind=f"tcp://{bind_host}:{settings['peer_port']}",
    )
