"""The gateway's configuration: a frozen, picklable object loaded from TOML.

The file has a `[gateway]` table of settings (the table below, which the CLI
mirrors flag for flag), `[groups.NAME]` (tokens, balancing, and the rules and
upstreams its clients get), `[[routes]]` (ingress: request -> group),
`[[forward]]` (egress: request from a client -> gateway upstream) and
`[upstreams.NAME]` (the gateway's own upstreams for egress).
"""
from __future__ import annotations

import argparse
import datetime
import os
from dataclasses import dataclass
from typing import Any, Mapping

from gateway.balance import STREAM_POLICIES
from gateway.cluster.config import CLUSTER_SETTINGS, check_cluster
from gateway.exposure import is_loopback, mask_settings
from gateway.groupconfig import GroupConfig, Upstream, parse_group_config, parse_upstreams
from gateway.limits import LIMIT_KEYS, Limits, parse_limits
from gateway.ports import port_clash
from gateway.rules import Rule, parse_rules
from gateway.settings import (
    ConfigError, Setting, SettingsAccess, apply_env, apply_overrides, boolean, check_mapping, choice, entry_settings, load_section, port,
    non_negative_int, positive_float, positive_int, read_toml, string,
)

ENV_PREFIX = "TUNNEL_GATEWAY_"

__all__ = ["ENV_PREFIX", "GATEWAY_SETTINGS", "RESTART_ONLY", "GroupSpec", "Token", "GatewayConfig", "load_gateway_config",
           "restart_only_change"]

def worker_count(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError("must be a number of workers (0: one per core)")
    return v


GATEWAY_SETTINGS: tuple[Setting, ...] = (
    Setting("workers", 0, worker_count, "worker processes (0: one per core)"),
    Setting("host", "0.0.0.0", string, "address the HTTP entry and tunnel port listen on"),
    Setting("http_port", 8001, port, "public HTTP entry port"),
    Setting("grpc_port", 8002, port, "public gRPC entry port (0: off)"),
    Setting("tunnel_port", 50001, port, "tunnel port (gRPC) that clients connect to"),
    Setting("admin_host", "127.0.0.1", string, "address of the admin port"),
    Setting("admin_port", 9090, port, "admin port: /healthz, /admin/status"),
    Setting("admin_token", "", string,
            "bearer token the admin endpoints that change something or show request data require; "
            "required when admin_host is not loopback"),
    Setting("request_timeout", 30.0, positive_float, "default seconds to wait for a response head"),
    Setting("stream_idle_timeout", 300.0, positive_float,
            "after a response head, the longest silence between body chunks (long streams, SSE)"),
    Setting("max_inflight_per_stream", 1000, positive_int, "requests in flight on one tunnel stream"),
    Setting("max_header_bytes", 16384, positive_int, "largest request head accepted (431 above)"),
    Setting("max_body_bytes", 1 << 30, positive_int, "largest request body accepted (413 above)"),
    Setting("retry_body_bytes", 65536, non_negative_int,
            "largest request body kept whole so that a request whose tunnel is lost before any response byte "
            "can be retried once on another client (GET, HEAD, OPTIONS, or a route with retry = true; 0: none)"),
    *entry_settings("HTTP entry", 10000, " per worker"),
    Setting("heartbeat_interval", 5.0, positive_float, "seconds between PINGs; 3 missed drop the peer"),
    Setting("hello_timeout", 10.0, positive_float, "seconds a new tunnel has to send HELLO"),
    Setting("tunnel_connects_per_source", 300, positive_int,
            "new tunnel connections a minute from one address, per worker (beyond: refused, RESOURCE_EXHAUSTED)"),
    Setting("tunnel_failed_hellos_per_source", 10, positive_int,
            "refused HELLOs a minute from one address, per worker; beyond, its new connections are refused"),
    Setting("tunnel_connects_per_group", 600, positive_int,
            "new authenticated tunnel connections a minute of one group, per worker"),
    Setting("tunnel_failed_hellos_per_group", 60, positive_int,
            "refused HELLOs a minute from one address naming one group, per worker; beyond, that address's "
            "HELLOs naming it are refused (never other addresses')"),
    Setting("tunnel_max_streams_per_group", 1000, positive_int,
            "tunnel streams one group may hold on a worker (checked after the credentials)"),
    Setting("chunk_size", 65536, positive_int, "largest DATA frame payload"),
    Setting("stream_window", 262144, positive_int, "per-request flow-control window, bytes"),
    Setting("max_batch_bytes", 1 << 20, positive_int, "target size of one gRPC message of frames"),
    Setting("max_queue_bytes", 8 << 20, positive_int, "outbound bytes queued per stream before 503"),
    Setting("grpc_event_engine", False, boolean,
            "gRPC I/O on its EventEngine threads instead of its polling engine (read at start; slower here: docs/performance.md)"),
    Setting("tls_cert", "", string, "certificate (PEM) for TLS on the tunnel port (and the HTTP entry with http_tls)"),
    Setting("tls_key", "", string, "private key (PEM) of tls_cert"),
    Setting("tls_client_ca", "", string, "CA (PEM) that signs client certificates: requires mTLS on the tunnel"),
    Setting("http_tls", False, boolean, "serve the HTTP entry over TLS with tls_cert"),
    Setting("proxy_protocol", False, boolean,
            "the HTTP entry and the tunnel port take the PROXY protocol (v1, v2) from an L4 balancer: each "
            "connection must start with its header (within header_timeout), whose source is the caller"),
    Setting("force_cross_worker", False, boolean,
            "send requests through the router to another worker when one holds a stream (to measure the hop)"),
    *CLUSTER_SETTINGS,
    Setting("watch_config", True, boolean, "reload when the config file changes on disk (checked every second)"),
    Setting("shutdown_grace", 30.0, positive_float, "seconds in-flight requests get on shutdown"),
    Setting("worker_timeout", 30.0, positive_float,
            "a worker whose event loop is silent this long (hung, stopped) is killed and respawned"),
    Setting("access_log", "stdout", string, "access log: off, stdout or a file path"),
    Setting("log_level", "info", choice("debug", "info", "warning", "error"), "log level"),
    Setting("log_format", "json", choice("json", "text"), "log line format"),
)


# Settings read once at start: the ports claimed and bound, the worker count, TLS, the
# gRPC engine. A reload that changes one is rejected whole, so what runs is never
# half the old file and half the new one.
RESTART_ONLY: tuple[str, ...] = (
    "workers", "host", "http_port", "grpc_port", "tunnel_port", "admin_host", "admin_port",
    "tls_cert", "tls_key", "tls_client_ca", "http_tls", "grpc_event_engine",
    "proxy_protocol",
    # The router joins the fleet once, at start.
    *(s.name for s in CLUSTER_SETTINGS),
)


def restart_only_change(old: "GatewayConfig", new: "GatewayConfig") -> ConfigError | None:
    """The first setting a reload from `old` to `new` cannot apply, as an error naming it."""
    for key in RESTART_ONLY:
        if old.settings.get(key) != new.settings.get(key):
            # Masked: a secret (cluster_secret_key) must not reach the log by a reload.
            was, now = (mask_settings({key: c.settings.get(key)})[key] for c in (old, new))
            return ConfigError(new.path, key, f"takes a restart (running with {was!r}, "
                                              f"the file says {now!r}); nothing reloaded")
    return None


@dataclass(frozen=True)
class Token:
    value: str
    expires: float | None = None  # unix time; None: never

    def valid_at(self, now: float) -> bool:
        return self.expires is None or now < self.expires


@dataclass(frozen=True)
class GroupSpec:
    name: str
    tokens: tuple[Token, ...]
    balance: str
    client: GroupConfig
    hash_key: str = "client_ip"
    limits: Limits = Limits()
    client_cert_names: tuple[str, ...] = ()  # with mTLS: the client certificate must match one


@dataclass(frozen=True)
class GatewayConfig(SettingsAccess):
    path: str
    settings: Mapping[str, Any]
    groups: Mapping[str, GroupSpec]
    routes: tuple[Rule, ...]
    forward: tuple[Rule, ...]
    upstreams: Mapping[str, Upstream]
    grpc_routes: tuple[Rule, ...] = ()


def _parse_tokens(raw: Any, file: str, key: str) -> tuple[Token, ...]:
    """Tokens are strings, or tables {token = "...", expires = 2026-12-01T00:00:00Z} for rotation."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(file, key, "must be a non-empty list of tokens")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str) and item:
            out.append(Token(item))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("token"), str) or not item["token"]:
            raise ConfigError(file, f"{key}[{i}]", "must be a non-empty string or {token = \"...\", expires = DATETIME}")
        unknown = set(item) - {"token", "expires"}
        if unknown:
            raise ConfigError(file, f"{key}[{i}].{sorted(unknown)[0]}", "unknown key")
        expires = item.get("expires")
        if expires is not None:
            if not isinstance(expires, datetime.datetime):
                raise ConfigError(file, f"{key}[{i}].expires", "must be a TOML date-time like 2026-12-01T00:00:00Z")
            if expires.tzinfo is None:
                expires = expires.replace(tzinfo=datetime.timezone.utc)
            expires = expires.timestamp()
        out.append(Token(item["token"], expires))
    return tuple(out)


def _parse_groups(raw: Any, file: str) -> dict[str, GroupSpec]:
    groups = {}
    for name, table in check_mapping(raw, file, "groups").items():
        key = f"groups.{name}"
        if not isinstance(table, dict):
            raise ConfigError(file, key, "must be a table")
        unknown = set(table) - {"tokens", "balance", "hash_key", "rules", "upstreams", "client_cert_names"} - LIMIT_KEYS
        if unknown:
            raise ConfigError(file, f"{key}.{sorted(unknown)[0]}", "unknown key")
        balance = table.get("balance", "round_robin")
        if balance not in STREAM_POLICIES:
            raise ConfigError(file, f"{key}.balance", f"must be one of {', '.join(STREAM_POLICIES)}")
        hash_key = table.get("hash_key", "client_ip")
        if not isinstance(hash_key, str) or not (
            hash_key == "client_ip" or hash_key.startswith("header:") or hash_key.startswith("cookie:")
        ):
            raise ConfigError(file, f"{key}.hash_key", "must be client_ip, header:NAME or cookie:NAME")
        names = table.get("client_cert_names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(file, f"{key}.client_cert_names", "must be a list of name patterns like *.agents.example")
        groups[name] = GroupSpec(
            name, _parse_tokens(table.get("tokens"), file, f"{key}.tokens"), balance,
            parse_group_config(table, file, key), hash_key, parse_limits(table, file, key), tuple(names),
        )
    return groups


def load_gateway_config(path: str, args: argparse.Namespace | None = None) -> GatewayConfig:
    """Read and validate `path`; CLI flags in `args` override the file."""
    doc = read_toml(path)
    unknown = set(doc) - {"gateway", "groups", "routes", "grpc_routes", "forward", "upstreams"}
    if unknown:
        raise ConfigError(path, sorted(unknown)[0], "unknown table")
    settings = load_section(doc.get("gateway"), GATEWAY_SETTINGS, path, "gateway")
    apply_env(settings, GATEWAY_SETTINGS, ENV_PREFIX)
    if args is not None:
        apply_overrides(settings, args, GATEWAY_SETTINGS)
    if settings["chunk_size"] > settings["stream_window"]:
        raise ConfigError(path, "gateway.chunk_size", "must not exceed gateway.stream_window")
    if settings["max_header_bytes"] + settings["chunk_size"] > settings["max_batch_bytes"] * 3:
        raise ConfigError(path, "gateway.max_batch_bytes", "too small for a head plus a chunk")
    for key in ("tls_cert", "tls_key", "tls_client_ca"):
        if settings[key] and not os.path.isfile(settings[key]):
            raise ConfigError(path, f"gateway.{key}", f"file {settings[key]!r} not found")
    if bool(settings["tls_cert"]) != bool(settings["tls_key"]):
        raise ConfigError(path, "gateway.tls_key", "tls_cert and tls_key go together")
    if (settings["tls_client_ca"] or settings["http_tls"]) and not settings["tls_cert"]:
        raise ConfigError(path, "gateway.tls_cert", "is required for tls_client_ca and http_tls")
    if settings["admin_port"] and not is_loopback(settings["admin_host"]) and not settings["admin_token"]:
        raise ConfigError(path, "gateway.admin_token",
                          f"is required when admin_host ({settings['admin_host']}) is not a loopback address")
    check_cluster(settings, path)
    clash = port_clash(settings)
    if clash is not None:
        first, second = clash
        raise ConfigError(path, f"gateway.{second}",
                          f"port {settings[second]} is also gateway.{first} (on overlapping addresses)")
    groups = _parse_groups(doc.get("groups"), path)
    routes = parse_rules(doc.get("routes"), path, "routes", "group", groups, settings["request_timeout"],
                         retry=True)
    grpc_routes = parse_rules(doc.get("grpc_routes"), path, "grpc_routes", "group", groups,
                              settings["request_timeout"])
    upstreams = parse_upstreams(doc.get("upstreams"), path, "upstreams")
    forward = parse_rules(doc.get("forward"), path, "forward", "upstream", upstreams, settings["request_timeout"])
    return GatewayConfig(path, settings, groups, routes, forward, upstreams, grpc_routes)
