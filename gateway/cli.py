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
import urllib.request

import orjson

from gateway import __version__
from gateway.cluster.config import curve_keypair
from gateway.config import ENV_PREFIX, GATEWAY_SETTINGS, GatewayConfig, load_gateway_config
from gateway.ports import PortUnavailable, claim_ports, listen_for_peers
from gateway.config_view import diff_configs, effective_config
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
        p.add_argument("--diff", action="store_true",
                       help="print what a reload of the file would change in the running gateway (asks its admin "
                            "port, with the file's admin_token: GET /admin/config)")
        p.add_argument("--admin", default=None, help="with --diff: the running gateway's admin URL "
                                                     "(default: the file's admin_host and admin_port)")
    else:
        p.add_argument("--config", "-c", default=None, help="TOML config file (default: conf/gateway.toml)")
    p.add_argument("--version", action="version", version=f"tunnel-gateway {__version__}")
    add_arguments(p, GATEWAY_SETTINGS, ENV_PREFIX)
    if not check:
        add_quick_arguments(p)
    return p


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
    if args.diff:
        return print_diff(config, args.admin)
    sys.stdout.write(orjson.dumps(effective_config(config), option=orjson.OPT_INDENT_2).decode() + "\n")
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.config}: ok", file=sys.stderr)
    return 0


def print_diff(config: GatewayConfig, admin: str | None) -> int:
    """`check-config --diff`: the running gateway's config against the file's, a line a change."""
    host = config.admin_host if config.admin_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = f"{admin or f'http://{host}:{config.admin_port}'}/admin/config"
    headers = {"Authorization": f"Bearer {config.admin_token}"} if config.admin_token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            running = orjson.loads(r.read())
    except (OSError, ValueError) as exc:
        print(f"tunnel-gateway: cannot read the running config from {url}: {exc}", file=sys.stderr)
        return 1
    changes = diff_configs(running, effective_config(config))
    print("\n".join(changes) if changes else f"{config.path}: a reload changes nothing")
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
