"""`tunnel-client`: connect to the gateway, serve the group, run the local entry."""
from __future__ import annotations

import argparse
import logging
import sys

import orjson
import uvloop
from setproctitle import setproctitle

from gateway import __version__
from gateway.client.config import CLIENT_SETTINGS, ENV_PREFIX, load_client_config
from gateway.client.quick import Console, prepare_http_args
from gateway.exposure import is_loopback, mask_settings
from gateway.grpc_io import choose_grpc_io
from gateway.logs import setup_logging
from gateway.settings import ConfigError, add_arguments

__all__ = ["main"]

EXIT_BAD_CONFIG = 2  # also: credentials the gateway refused, which no retry mends


def build_parser(check: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunnel-client check-config" if check else "tunnel-client",
        description="Validate a client config and print the effective config." if check else
        "Tunnel client: connects out to a tunnel-gateway, serves its group, runs the local egress entry.",
        epilog=("Also: 'tunnel-client check-config FILE', 'tunnel-client http PORT' (a quick tunnel). "
                "Precedence: flag > environment (TUNNEL_CLIENT_*) > file > default. Exit codes: 0 stopped by "
                "SIGTERM/SIGINT, 1 replaced by another process with its identity, 2 bad config or usage, or "
                "credentials the gateway refused (without --retry-on-reject)."),
    )
    if check:
        p.add_argument("config", help="TOML config file with a [client] table")
    else:
        p.add_argument("--config", "-c", default=None, help="TOML config file with a [client] table")
    p.add_argument("--version", action="version", version=f"tunnel-client {__version__}")
    add_arguments(p, CLIENT_SETTINGS, ENV_PREFIX)
    return p


def report_errors(exc: ConfigError) -> None:
    """Every error of the config, one `file: key: message` a line, on stderr."""
    count = len(exc.errors)
    print(f"tunnel-client: bad config ({count} error{'s' if count > 1 else ''}):", file=sys.stderr)
    for e in exc.errors:
        print(e.line, file=sys.stderr)


def check_config(argv: list[str]) -> int:
    args = build_parser(check=True).parse_args(argv)
    try:
        config = load_client_config(args.config, args)
    except ConfigError as exc:
        report_errors(exc)
        return EXIT_BAD_CONFIG
    shown = {"file": config.path, "client": mask_settings(config.settings)}
    sys.stdout.write(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode() + "\n")
    print(f"{args.config}: ok", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "check-config":
        return check_config(argv[1:])
    quick = bool(argv) and argv[0] == "http"
    args = prepare_http_args(build_parser(), argv[1:]) if quick else build_parser().parse_args(argv)
    try:
        config = load_client_config(args.config, args)
    except ConfigError as exc:
        report_errors(exc)
        return EXIT_BAD_CONFIG
    setproctitle(f"tunnel-client: {config.client_id}")
    setup_logging(config.log_level, config.log_format, prefix={"client_id": config.client_id})
    remote = [s for s in config.server.split(",") if not is_loopback(s.rpartition(":")[0])]
    if not (config.tls or config.tls_ca or config.insecure) and remote:
        logging.getLogger("gateway.client").warning(
            "connecting to %s without TLS: the token crosses the network in plain text (set tls)", ",".join(remote))
    choose_grpc_io(config.grpc_event_engine)
    # Imported only now: they load grpc, which reads the I/O engine chosen above once, at import.
    from gateway.client.connection import QUICK_REFUSALS, Refused
    from gateway.client.serve import serve

    console = Console(config.quick_upstream, f"http://{config.admin_host}:{config.admin_port}"
                      if config.admin_port else "") if quick else None
    try:
        return uvloop.run(serve(config, console))
    except Refused as exc:
        hint = "" if exc.code in QUICK_REFUSALS else " (check group, token and certificate; --retry-on-reject keeps trying)"
        print(f"tunnel-client: the gateway refused this client: {exc}{hint}", file=sys.stderr)
        return EXIT_BAD_CONFIG


if __name__ == "__main__":
    sys.exit(main())
