"""`tunnel-gateway`: the command line. Flags mirror the [gateway] settings.

    tunnel-gateway [-c FILE] [--flag VALUE ...]     run the gateway
    tunnel-gateway check-config FILE [--flag ...]   validate, print the effective config
    tunnel-gateway keygen                           print a new CURVE keypair for a fleet node

Precedence: flag > environment (TUNNEL_GATEWAY_*) > file > default.
Exit codes: 0 ok, 1 a forced stop cut requests in flight, 2 bad config or usage,
3 could not bind a port.
"""
from __future__ import annotations

import argparse
import os
import sys

import orjson

from gateway import __version__
from gateway.cluster.config import curve_keypair
from gateway.config import ENV_PREFIX, GATEWAY_SETTINGS, GatewayConfig, load_gateway_config
from gateway.exposure import mask_headers, mask_settings, mask_url
from gateway.ports import PortUnavailable, claim_ports, listen_for_peers
from gateway.settings import ConfigError, add_arguments
from gateway.supervisor import EXIT_BOOT_ERROR, Supervisor

__all__ = ["main", "build_parser", "effective_config"]

EXIT_BAD_CONFIG = 2


def build_parser(check: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunnel-gateway check-config" if check else "tunnel-gateway",
        description="Validate a config file and print the effective config." if check else
        "Tunnel gateway: HTTP entry, tunnel endpoint, admin port; one worker process per core.",
        epilog="Also: 'tunnel-gateway check-config FILE', 'tunnel-gateway keygen'. Exit codes: 0 ok, 1 forced stop, 2 bad config or usage, 3 could not bind.",
    )
    if check:
        p.add_argument("config", help="TOML config file to check")
    else:
        p.add_argument("--config", "-c", default="conf/gateway.toml", help="TOML config file (default: conf/gateway.toml)")
    p.add_argument("--version", action="version", version=f"tunnel-gateway {__version__}")
    add_arguments(p, GATEWAY_SETTINGS, ENV_PREFIX)
    return p


def effective_config(config: GatewayConfig) -> dict:
    """The config as the gateway will run it, secrets left out: group tokens as a
    count, admin_token and other secrets masked, passwords in URLs masked."""

    def rule(r) -> dict:
        out = {}
        for f in r.__dataclass_fields__:
            v = getattr(r, f)
            out[f] = sorted(v) if isinstance(v, frozenset) else v
        out["headers"], out["add_headers"] = mask_headers(r.headers), mask_headers(r.add_headers)
        return mask_settings(out)

    return {
        "file": config.path,
        "gateway": mask_settings(config.settings),
        "groups": {
            name: {
                "tokens": len(g.tokens),
                "balance": g.balance,
                "config_version": g.client.version,
                "rules": [rule(r) for r in g.client.rules],
                "upstreams": {u: [mask_url(s) for s in up.servers] for u, up in g.client.upstreams.items()},
            }
            for name, g in config.groups.items()
        },
        "routes": [rule(r) for r in config.routes],
        "forward": [rule(r) for r in config.forward],
        "upstreams": {u: {"servers": [mask_url(s) for s in up.servers], "balance": up.balance}
                      for u, up in config.upstreams.items()},
    }


def check_config(argv: list[str]) -> int:
    args = build_parser(check=True).parse_args(argv)
    try:
        config = load_gateway_config(args.config, args)
    except ConfigError as exc:
        print(f"tunnel-gateway: bad config: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    sys.stdout.write(orjson.dumps(effective_config(config), option=orjson.OPT_INDENT_2).decode() + "\n")
    print(f"{args.config}: ok", file=sys.stderr)
    return 0


def keygen() -> int:
    """A node's keypair as [gateway] lines: the secret for its own file, the public key for every node's list."""
    public, secret = curve_keypair()
    print(f'cluster_secret_key = "{secret}"  # this node only: keep it secret')
    print(f'# public key (add it to cluster_public_keys of every node, this one included): "{public}"')
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "check-config":
        return check_config(argv[1:])
    if argv == ["keygen"]:
        return keygen()
    args = build_parser().parse_args(argv)
    try:
        config = load_gateway_config(args.config, args)
    except ConfigError as exc:
        print(f"tunnel-gateway: bad config: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    workers = config.workers or os.cpu_count() or 1
    try:
        # Held while the gateway runs: its workers bind beside these, another gateway cannot (gateway/ports.py).
        claimed = claim_ports(config.settings)
    except PortUnavailable as exc:
        print(f"tunnel-gateway: cannot start: {exc}", file=sys.stderr)
        return EXIT_BOOT_ERROR
    peer = claimed.get("peer_port")
    try:
        return Supervisor(config, workers, args, listen_for_peers(peer) if peer else None).run()
    finally:
        for sock in claimed.values():
            sock.close()


if __name__ == "__main__":
    sys.exit(main())
