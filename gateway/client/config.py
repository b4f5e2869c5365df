"""The tunnel client's configuration: only how to reach the gateway and who
it is. Rules and upstreams come from the gateway (the config centre)."""
from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping

from gateway.client.fleet import server_list
from gateway.inspection import header_names
from gateway.settings import (
    ConfigError, Errors, Setting, SettingsAccess, apply_env, apply_overrides, boolean, choice, entry_settings, load_section,
    non_negative_int, port, positive_float, positive_int, read_toml, string, unknown_keys,
)

ENV_PREFIX = "TUNNEL_CLIENT_"

__all__ = ["upstream_patterns", "ENV_PREFIX", "CLIENT_SETTINGS", "ClientConfig", "load_client_config"]

def upstream_patterns(v: Any) -> tuple[str, ...]:
    """host:port patterns, as a TOML list or one comma-separated string (flag, environment); lower-cased."""
    items = [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) and ":" in i.strip("[]") for i in items):
        raise ValueError("must be a list of host:port patterns like 127.0.0.1:8080 or *.internal:*")
    return tuple(i.strip().lower() for i in items)


CLIENT_SETTINGS: tuple[Setting, ...] = (
    Setting("server", "127.0.0.1:50001", server_list,
            "gateway tunnel address host:port, or a comma-separated list of a fleet's nodes (it learns the others)"),
    Setting("learn_fleet", True, boolean,
            "use the fleet's nodes the gateway names, spreading the connections (false: only the server list)"),
    Setting("group", "", string, "client group to join (required)"),
    Setting("token", "", string, "token of the group (required)"),
    Setting("quick_upstream", "", string,
            "a quick tunnel: every request to this base URL, under a public name the gateway routes on the fly "
            "(tunnel-client http PORT sets it)"),
    Setting("quick_name", "", string, "a quick tunnel's public name, one DNS label (tunnel-client http --name)"),
    Setting("client_id", "", string, "this client's id (default: hostname-pid)"),
    Setting("connections", 2, positive_int, "parallel tunnel connections (each its own stream)"),
    Setting("spread_workers", True, boolean,
            "move a connection that shares a gateway worker with another of this client's until every worker "
            "it can reach holds one, so requests do not cross workers (false: where the kernel put them)"),
    Setting("local_host", "127.0.0.1", string, "address of the local egress entry"),
    Setting("local_port", 7001, port, "local egress entry port (0: off)"),
    Setting("admin_host", "127.0.0.1", string, "address of the client's status port"),
    Setting("admin_port", 0, port, "client status port: /healthz, /status and the Inspector at / (0: off)"),
    Setting("inspect", True, boolean,
            "keep the last requests this client served from the tunnel for the Inspector on the status port "
            "(/, /api/requests): headers and the start of each body, secrets masked"),
    Setting("inspect_requests", 200, positive_int, "requests the Inspector keeps"),
    Setting("inspect_body_bytes", 65536, non_negative_int,
            "bytes of each request and response body the Inspector keeps (whole: the request can be replayed)"),
    Setting("inspect_mask_headers", (), header_names,
            "headers the Inspector masks besides Authorization, Cookie, Set-Cookie, Proxy-Authorization, "
            "X-Api-Key and names holding token, secret, password, api-key, auth, session or signature"),
    Setting("allow_upstreams", (), upstream_patterns,
            "the only upstream servers the gateway's config may send this client's requests to, host:port patterns "
            "(* matches within a name, e.g. 127.0.0.1:*, *.internal:443); a config naming another is refused and "
            "the one in force kept (empty: any)"),
    Setting("config_cache", "", string, "file keeping the last group config, used at start until the gateway answers"),
    Setting("tls", False, boolean, "connect to the gateway over TLS"),
    Setting("tls_ca", "", string, "CA (PEM) to verify the gateway with (default: the system's roots)"),
    Setting("tls_cert", "", string, "client certificate (PEM) for mTLS"),
    Setting("tls_key", "", string, "private key (PEM) of tls_cert"),
    Setting("insecure", False, boolean, "TLS without verifying the gateway's certificate (warns)"),
    Setting("request_timeout", 30.0, positive_float, "seconds an egress request waits for a response head"),
    Setting("stream_idle_timeout", 300.0, positive_float,
            "egress: after a response head, the longest silence between body chunks"),
    Setting("max_inflight", 1000, positive_int, "requests in flight on the tunnel stream"),
    Setting("grpc_event_engine", False, boolean,
            "gRPC I/O on its EventEngine threads instead of its polling engine (read at start; slower here: docs/performance.md)"),
    Setting("tunnel_library", "builtin", choice("builtin", "grpcio"),
            "what drives the tunnel's gRPC stream: builtin (the client's own HTTP/2 framing, on its event loop) or "
            "grpcio (gRPC core); the same gRPC call on the wire (docs/performance.md)"),
    Setting("max_header_bytes", 16384, positive_int, "largest egress request head (431 above)"),
    Setting("max_body_bytes", 1 << 30, positive_int, "largest egress request body (413 above)"),
    *entry_settings("local entry", 4096, ""),
    Setting("connect_timeout", 10.0, positive_float, "seconds to wait for the gateway's WELCOME"),
    Setting("reconnect_initial", 0.5, positive_float, "first reconnect delay, seconds"),
    Setting("reconnect_max", 30.0, positive_float, "reconnect delay cap, seconds"),
    Setting("retry_on_reject", False, boolean,
            "keep retrying (a few times a minute) when the gateway refuses the credentials (bad_credentials, "
            "missing_token, token_expired, bad_certificate) instead of exiting with status 2"),
    Setting("access_log", "stdout", string, "access log of the local entry: off, stdout or a file path"),
    Setting("log_level", "info", choice("debug", "info", "warning", "error", fold_case=True),
            "log level"),
    Setting("log_format", "json", choice("json", "text"), "log line format"),
)


@dataclass(frozen=True)
class ClientConfig(SettingsAccess):
    path: str
    settings: Mapping[str, Any]


def load_client_config(path: str | None, args: argparse.Namespace | None = None) -> ClientConfig:
    """Read and validate `path` (None: defaults, flags and environment only); every
    error found is raised together: one ConfigError naming the first, carrying the rest."""
    doc = read_toml(path) if path else {}
    where = path or "defaults"
    errors = Errors()
    for exc in unknown_keys(doc, ("client",), where, "", "table"):
        errors.add(exc)
    settings = load_section(doc.get("client"), CLIENT_SETTINGS, where, "client", errors)
    errors.check(apply_env, settings, CLIENT_SETTINGS, ENV_PREFIX)
    if args is not None:
        errors.check(apply_overrides, settings, args, CLIENT_SETTINGS)
    if settings["quick_upstream"] and not settings["group"]:
        settings["group"] = "quick"  # the gateway makes the tunnel's own group, quick.NAME
    for key in ("group", "token"):
        if not settings[key]:
            errors.add(ConfigError(where, f"client.{key}", f"is required (--{key}, {ENV_PREFIX}{key.upper()})"))
    errors.raise_any()
    if not settings["client_id"]:
        settings["client_id"] = f"{socket.gethostname()}-{os.getpid()}"
    return ClientConfig(where, settings)
