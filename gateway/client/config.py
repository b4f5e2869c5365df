"""The tunnel client's configuration: only how to reach the gateway and who
it is. Rules and upstreams come from the gateway (the config centre)."""
from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping

from gateway.client.fleet import server_list
from gateway.settings import (
    ConfigError, Setting, SettingsAccess, apply_env, apply_overrides, boolean, choice, entry_settings, load_section, port,
    positive_float,
    positive_int, read_toml, string,
)

ENV_PREFIX = "TUNNEL_CLIENT_"

__all__ = ["ENV_PREFIX", "CLIENT_SETTINGS", "ClientConfig", "load_client_config"]

CLIENT_SETTINGS: tuple[Setting, ...] = (
    Setting("server", "127.0.0.1:50001", server_list,
            "gateway tunnel address host:port, or a comma-separated list of a fleet's nodes (it learns the others)"),
    Setting("learn_fleet", True, boolean,
            "use the fleet's nodes the gateway names, spreading the connections (false: only the server list)"),
    Setting("group", "", string, "client group to join (required)"),
    Setting("token", "", string, "token of the group (required)"),
    Setting("client_id", "", string, "this client's id (default: hostname-pid)"),
    Setting("connections", 2, positive_int, "parallel tunnel connections (each its own stream)"),
    Setting("local_host", "127.0.0.1", string, "address of the local egress entry"),
    Setting("local_port", 7001, port, "local egress entry port (0: off)"),
    Setting("admin_host", "127.0.0.1", string, "address of the client's status port"),
    Setting("admin_port", 0, port, "client status port: /healthz, /status (0: off)"),
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
    Setting("max_header_bytes", 16384, positive_int, "largest egress request head (431 above)"),
    Setting("max_body_bytes", 1 << 30, positive_int, "largest egress request body (413 above)"),
    *entry_settings("local entry", 4096, ""),
    Setting("connect_timeout", 10.0, positive_float, "seconds to wait for the gateway's WELCOME"),
    Setting("reconnect_initial", 0.5, positive_float, "first reconnect delay, seconds"),
    Setting("reconnect_max", 30.0, positive_float, "reconnect delay cap, seconds"),
    Setting("access_log", "stdout", string, "access log of the local entry: off, stdout or a file path"),
    Setting("log_level", "info", choice("debug", "info", "warning", "error"), "log level"),
    Setting("log_format", "json", choice("json", "text"), "log line format"),
)


@dataclass(frozen=True)
class ClientConfig(SettingsAccess):
    path: str
    settings: Mapping[str, Any]


def load_client_config(path: str | None, args: argparse.Namespace | None = None) -> ClientConfig:
    doc = read_toml(path) if path else {}
    where = path or "defaults"
    unknown = set(doc) - {"client"}
    if unknown:
        raise ConfigError(where, sorted(unknown)[0], "unknown table")
    settings = load_section(doc.get("client"), CLIENT_SETTINGS, where, "client")
    apply_env(settings, CLIENT_SETTINGS, ENV_PREFIX)
    if args is not None:
        apply_overrides(settings, args, CLIENT_SETTINGS)
    for key in ("group", "token"):
        if not settings[key]:
            raise ConfigError(where, f"client.{key}", "is required")
    if not settings["client_id"]:
        settings["client_id"] = f"{socket.gethostname()}-{os.getpid()}"
    return ClientConfig(where, settings)
