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
from gateway.inspection import header_names
from gateway.groupconfig import GroupConfig, Upstream, parse_group_config, parse_upstreams
from gateway.limits import LIMIT_KEYS, Limits, parse_limits
from gateway.rollout.spec import RolloutSpec, parse_rollout
from gateway.ports import port_clash
from gateway.quick import QUICK_PREFIX, QuickConfig, parse_quick
from gateway.rules import Rule, parse_rules
from gateway.settings import (
    ConfigError, Errors, Setting, SettingsAccess, apply_env, apply_overrides, boolean, check_mapping, choice, entry_settings,
    load_section, port, unknown_keys,
    non_negative_int, positive_float, positive_int, read_toml, string,
)

ENV_PREFIX = "TUNNEL_GATEWAY_"

__all__ = ["ENV_PREFIX", "GATEWAY_SETTINGS", "RESTART_ONLY", "RestartRequired", "GroupSpec", "Token", "GatewayConfig", "load_gateway_config",
           "restart_only_change"]

def worker_count(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError("must be a number of workers (0: one per core)")
    return v


# DATA frames when chunk_size is 0: 128 KiB cost 5 % less CPU at 1 MiB than 64 KiB (docs/performance.md).
AUTO_CHUNK = 128 << 10

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
    Setting("rollout_state", "", string,
            "file keeping the staged rollouts across restarts (each group's last promoted config, the versions "
            "rolled back, the last rollouts); default: beside the config file, FILE.rollouts.json"),
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
    Setting("chunk_size", 0, non_negative_int, "largest DATA frame payload, bytes (0: 128 KiB, or the smaller window)"),
    Setting("stream_window", 1048576, positive_int,
            "per-request flow-control window on a client's tunnel, bytes (the client takes it from the gateway)"),
    Setting("channel_window", 262144, positive_int,
            "per-request flow-control window between workers and nodes, bytes (keep it the same on all of a fleet)"),
    Setting("max_batch_bytes", 1 << 20, positive_int, "target size of one gRPC message of frames"),
    Setting("max_queue_bytes", 8 << 20, positive_int,
            "outbound bytes queued per stream before 503 (bodies wait at half)"),
    Setting("grpc_event_engine", False, boolean,
            "gRPC I/O on its EventEngine threads instead of its polling engine (read at start; slower here: docs/performance.md)"),
    Setting("tunnel_server", "builtin", choice("builtin", "grpcio"),
            "what serves the tunnel port's gRPC calls: builtin (our own HTTP/2 framing, on the worker's event loop) "
            "or grpcio (gRPC core); the same gRPC service on the wire (docs/performance.md)"),
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
    Setting("inspect", True, boolean,
            "keep the last requests of each worker for the Inspector (/inspector, /admin/requests): headers and "
            "the start of each body, secrets masked"),
    Setting("inspect_requests", 200, positive_int, "requests the Inspector keeps per worker"),
    Setting("inspect_body_bytes", 65536, non_negative_int,
            "bytes of each request and response body the Inspector keeps (a request whose body was kept "
            "whole can be replayed)"),
    Setting("inspect_mask_headers", (), header_names,
            "headers the Inspector masks besides Authorization, Cookie, Set-Cookie, Proxy-Authorization, "
            "X-Api-Key and names holding token, secret, password, api-key, auth, session or signature"),
    Setting("log_level", "info", choice("debug", "info", "warning", "error", fold_case=True),
            "log level"),
    Setting("log_format", "json", choice("json", "text"), "log line format"),
)


# Settings read once at start: the ports claimed and bound, the worker count, TLS, the
# gRPC engine. A reload that changes one is rejected whole, so what runs is never
# half the old file and half the new one.
RESTART_ONLY: tuple[str, ...] = (
    "workers", "host", "http_port", "grpc_port", "tunnel_port", "admin_host", "admin_port",
    "tls_cert", "tls_key", "tls_client_ca", "http_tls", "grpc_event_engine",
    "proxy_protocol", "tunnel_server",
    # The router joins the fleet once, at start.
    *(s.name for s in CLUSTER_SETTINGS),
)


class RestartRequired(ConfigError):
    """A reload refused because settings that take a restart changed; names each."""


def restart_only_change(old: "GatewayConfig", new: "GatewayConfig") -> RestartRequired | None:
    """The settings a reload from `old` to `new` cannot apply: one error naming
    the first, carrying one for each other one (`errors`), or None."""
    changed = []
    for key in RESTART_ONLY:
        if old.settings.get(key) != new.settings.get(key):
            # Masked: a secret (cluster_secret_key) must not reach the log by a reload.
            was, now = (mask_settings({key: c.settings.get(key)})[key] for c in (old, new))
            changed.append(ConfigError(new.path, f"gateway.{key}", f"takes a restart (running with {was!r}, "
                                                                   f"the file says {now!r}); nothing reloaded"))
    if not changed:
        return None
    first, *rest = changed
    return RestartRequired(first.file, first.key, first.message, rest)


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
    rollout: RolloutSpec | None = None  # [groups.NAME.rollout]: config changes go to a canary first


@dataclass(frozen=True)
class GatewayConfig(SettingsAccess):
    path: str
    settings: Mapping[str, Any]
    groups: Mapping[str, GroupSpec]
    routes: tuple[Rule, ...]
    forward: tuple[Rule, ...]
    upstreams: Mapping[str, Upstream]
    grpc_routes: tuple[Rule, ...] = ()
    quick: QuickConfig | None = None  # quick tunnels allowed ([quick])


def _parse_tokens(raw: Any, file: str, key: str) -> tuple[Token, ...]:
    """Tokens are strings, or tables {token = "...", expires = 2026-12-01T00:00:00Z} for rotation."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(file, key, "must be a non-empty list of tokens")
    errors = Errors()
    out = []
    for i, item in enumerate(raw):
        token = errors.check(_parse_token, item, file, f"{key}[{i}]")
        if token is not None:
            out.append(token)
    errors.raise_any()
    return tuple(out)


def _parse_token(item: Any, file: str, key: str) -> Token:
    # A token's value is never quoted in a message: it is a secret.
    if isinstance(item, str) and item:
        return Token(item)
    if not isinstance(item, dict) or not isinstance(item.get("token"), str) or not item["token"]:
        raise ConfigError(file, key, "must be a non-empty string or {token = \"...\", expires = DATETIME}, "
                                     f"got a {type(item).__name__}")
    errors = Errors()
    for exc in unknown_keys(item, ("token", "expires"), file, key):
        errors.add(exc)
    expires = item.get("expires")
    if expires is not None:
        if not isinstance(expires, datetime.datetime):
            errors.add(ConfigError(file, f"{key}.expires",
                                   f"must be a TOML date-time like 2026-12-01T00:00:00Z, got {expires!r}"))
            expires = None
        else:
            if expires.tzinfo is None:
                expires = expires.replace(tzinfo=datetime.timezone.utc)
            expires = expires.timestamp()
    errors.raise_any()
    return Token(item["token"], expires)


_GROUP_KEYS = ("tokens", "balance", "hash_key", "rules", "upstreams", "client_cert_names", "rollout",
               *sorted(LIMIT_KEYS))


def _parse_group(name: str, table: Any, file: str) -> GroupSpec:
    key = f"groups.{name}"
    if not isinstance(table, dict):
        raise ConfigError(file, key, f"must be a table, got {table!r}")
    if name.startswith(QUICK_PREFIX):
        raise ConfigError(file, key, f"{name!r}: group names starting with {QUICK_PREFIX!r} are quick tunnels'")
    errors = Errors()
    for exc in unknown_keys(table, _GROUP_KEYS, file, key):
        errors.add(exc)
    balance = table.get("balance", "round_robin")
    if balance not in STREAM_POLICIES:
        errors.add(ConfigError(file, f"{key}.balance", f"must be one of {', '.join(STREAM_POLICIES)}, got {balance!r}"))
    hash_key = table.get("hash_key", "client_ip")
    if not isinstance(hash_key, str) or not (
        hash_key == "client_ip" or hash_key.startswith("header:") or hash_key.startswith("cookie:")
    ):
        errors.add(ConfigError(file, f"{key}.hash_key", f"must be client_ip, header:NAME or cookie:NAME, got {hash_key!r}"))
    names = table.get("client_cert_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        errors.add(ConfigError(file, f"{key}.client_cert_names",
                               f"must be a list of name patterns like *.agents.example, got {names!r}"))
    tokens = errors.check(_parse_tokens, table.get("tokens"), file, f"{key}.tokens")
    client = errors.check(parse_group_config, table, file, key)
    limits = errors.check(parse_limits, table, file, key)
    rollout = errors.check(parse_rollout, table.get("rollout"), file, f"{key}.rollout")
    errors.raise_any()
    return GroupSpec(name, tokens, balance, client, hash_key, limits, tuple(names), rollout)


def _parse_groups(raw: Any, file: str) -> dict[str, GroupSpec]:
    errors = Errors()
    groups = {}
    for name, table in check_mapping(raw, file, "groups").items():
        group = errors.check(_parse_group, name, table, file)
        if group is not None:
            groups[name] = group
    errors.raise_any()
    return groups


def _check_settings(settings: dict[str, Any], path: str, errors: Errors) -> None:
    """The checks across settings, each error added to `errors`."""
    def error(key: str, message: str) -> None:
        errors.add(ConfigError(path, f"gateway.{key}", message))

    for window in ("stream_window", "channel_window"):
        if settings["chunk_size"] > settings[window]:
            error("chunk_size", f"must not exceed gateway.{window} ({settings['chunk_size']} > {settings[window]})")
    if settings["max_header_bytes"] + settings["chunk_size"] > settings["max_batch_bytes"] * 3:
        error("max_batch_bytes", f"too small for a head plus a chunk, got {settings['max_batch_bytes']}")
    for key in ("tls_cert", "tls_key", "tls_client_ca"):
        if settings[key] and not os.path.isfile(settings[key]):
            error(key, f"file {settings[key]!r} not found")
    if bool(settings["tls_cert"]) != bool(settings["tls_key"]):
        error("tls_key", "tls_cert and tls_key go together")
    if (settings["tls_client_ca"] or settings["http_tls"]) and not settings["tls_cert"]:
        error("tls_cert", "is required for tls_client_ca and http_tls")
    if settings["admin_port"] and not is_loopback(settings["admin_host"]) and not settings["admin_token"]:
        error("admin_token", f"is required when admin_host ({settings['admin_host']!r}) is not a loopback address")
    errors.check(check_cluster, settings, path)
    clash = port_clash(settings)
    if clash is not None:
        first, second = clash
        error(second, f"port {settings[second]} is also gateway.{first} (on overlapping addresses)")


def load_gateway_config(path: str, args: argparse.Namespace | None = None) -> GatewayConfig:
    """Read and validate `path`; CLI flags in `args` override the file. Every error
    found is raised together: one ConfigError naming the first, carrying the rest."""
    doc = read_toml(path)
    errors = Errors()
    for exc in unknown_keys(doc, ("gateway", "groups", "routes", "grpc_routes", "forward", "upstreams", "quick"),
                            path, "", "table"):
        errors.add(exc)
    settings = load_section(doc.get("gateway"), GATEWAY_SETTINGS, path, "gateway", errors)
    errors.check(apply_env, settings, GATEWAY_SETTINGS, ENV_PREFIX)
    if args is not None:
        errors.check(apply_overrides, settings, args, GATEWAY_SETTINGS)
    if not settings["chunk_size"]:  # measured: docs/performance.md, "The heap, the windows, the interpreter"
        settings["chunk_size"] = min(AUTO_CHUNK, settings["stream_window"], settings["channel_window"])
    _check_settings(settings, path, errors)
    groups = errors.check(_parse_groups, doc.get("groups"), path, default=None)
    if groups is None:  # routes are checked against the names it has
        raw = doc.get("groups")
        groups = dict.fromkeys(raw) if isinstance(raw, dict) else {}
    routes = errors.check(parse_rules, doc.get("routes"), path, "routes", "group", groups, settings["request_timeout"],
                          retry=True, default=())
    grpc_routes = errors.check(parse_rules, doc.get("grpc_routes"), path, "grpc_routes", "group", groups,
                               settings["request_timeout"], default=())
    upstreams = errors.check(parse_upstreams, doc.get("upstreams"), path, "upstreams", default=None)
    if upstreams is None:
        raw = doc.get("upstreams")
        upstreams = dict.fromkeys(raw) if isinstance(raw, dict) else {}
    forward = errors.check(parse_rules, doc.get("forward"), path, "forward", "upstream", upstreams,
                           settings["request_timeout"], default=())
    quick = errors.check(parse_quick, doc.get("quick"), path, request_timeout=settings["request_timeout"],
                         parse_tokens=_parse_tokens, default=None,
                         overrides={"domain": getattr(args, "domain", None), "public_url": getattr(args, "public_url", None)})
    errors.raise_any()
    return GatewayConfig(path, settings, groups, routes, forward, upstreams, grpc_routes, quick)
