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
from gateway.quick_start import add_quick_arguments, quick_banner, quick_config_file
from gateway.settings import ConfigError, add_arguments
from gateway.supervisor import EXIT_BOOT_ERROR, Supervisor

__all__ = ["main", "build_parser", "effective_config", "report_errors"]

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
        p.add_argument("--config", "-c", default=None, help="TOML config file (default: conf/gateway.toml)")
    p.add_argument("--version", action="version", version=f"tunnel-gateway {__version__}")
    add_arguments(p, GATEWAY_SETTINGS, ENV_PREFIX)
    if not check:
        add_quick_arguments(p)
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
        "grpc_routes": [rule(r) for r in config.grpc_routes],
        "quick": None if config.quick is None else {
            "tokens": len(config.quick.tokens), "public_url": config.quick.public_url,
            "max_tunnels": config.quick.max_tunnels, "timeout": config.quick.timeout,
        },
        "forward": [rule(r) for r in config.forward],
        "upstreams": {u: {"servers": [mask_url(s) for s in up.servers], "balance": up.balance}
                      for u, up in config.upstreams.items()},
    }


def report_errors(program: str, exc: ConfigError) -> None:
    """Every error of a config, one `file: key: message` a line, on stderr."""
    count = len(exc.errors)
    print(f"{program}: bad config ({count} error{'s' if count > 1 else ''}):", file=sys.stderr)
    for e in exc.errors:
        print(e.line, file=sys.stderr)


def config_warnings(config: GatewayConfig) -> list[str]:
    """What is valid but likely not meant: a gateway that can serve nothing."""
    out = []
    if not config.groups:
        out.append(f"{config.path}: groups: no [groups.NAME]: no tunnel client can join")
    if not config.routes and not config.grpc_routes:
        out.append(f"{config.path}: routes: no [[routes]] or [[grpc_routes]]: every request to the entry gets 404")
    return out


def check_config(argv: list[str]) -> int:
    args = build_parser(check=True).parse_args(argv)
    try:
        config = load_gateway_config(args.config, args)
    except ConfigError as exc:
        report_errors("tunnel-gateway", exc)
        return EXIT_BAD_CONFIG
    sys.stdout.write(orjson.dumps(effective_config(config), option=orjson.OPT_INDENT_2).decode() + "\n")
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    remove_quick_file = None
    if args.quick:
        if args.config is not None:
            parser.error("--quick runs without a config file; a configured gateway allows quick tunnels "
                         "with a [quick] table")
        args.config, remove_quick_file = quick_config_file(args)
    elif args.token is not None:
        parser.error("--token goes with --quick (a configured gateway lists tokens in its [quick] table)")
    args.config = args.config or "conf/gateway.toml"
    try:
        return _run(args, args.config)
    finally:
        if remove_quick_file is not None:
            remove_quick_file()


def _run(args: argparse.Namespace, path: str) -> int:
    try:
        config = load_gateway_config(path, args)
    except ConfigError as exc:
        report_errors("tunnel-gateway", exc)
        return EXIT_BAD_CONFIG
    if config.quick is not None:
        print(quick_banner(config, args.token if args.quick else None), flush=True)
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
