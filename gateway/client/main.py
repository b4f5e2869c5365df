"""`tunnel-client`: connect to the gateway, serve the group, run the local entry."""
from __future__ import annotations

import argparse
import logging
import sys

import uvloop
from setproctitle import setproctitle

from gateway import __version__
from gateway.client.config import CLIENT_SETTINGS, ENV_PREFIX, load_client_config
from gateway.exposure import is_loopback
from gateway.grpc_io import choose_grpc_io
from gateway.logs import setup_logging
from gateway.settings import ConfigError, add_arguments

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunnel-client",
        description="Tunnel client: connects out to a tunnel-gateway, serves its group, runs the local egress entry.",
        epilog=("Precedence: flag > environment (TUNNEL_CLIENT_*) > file > default. Exit codes: 0 stopped by "
                "SIGTERM/SIGINT, 1 refused by the gateway or replaced by another process with its identity, "
                "2 bad config."),
    )
    p.add_argument("--config", "-c", default=None, help="TOML config file with a [client] table")
    p.add_argument("--version", action="version", version=f"tunnel-client {__version__}")
    add_arguments(p, CLIENT_SETTINGS, ENV_PREFIX)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_client_config(args.config, args)
    except ConfigError as exc:
        print(f"tunnel-client: bad config: {exc}", file=sys.stderr)
        return 2
    setproctitle(f"tunnel-client: {config.client_id}")
    setup_logging(config.log_level, config.log_format, prefix={"client_id": config.client_id})
    remote = [s for s in config.server.split(",") if not is_loopback(s.rpartition(":")[0])]
    if not (config.tls or config.tls_ca or config.insecure) and remote:
        logging.getLogger("gateway.client").warning(
            "connecting to %s without TLS: the token crosses the network in plain text (set tls)", ",".join(remote))
    choose_grpc_io(config.grpc_event_engine)
    # Imported only now: it loads grpc, which reads the I/O engine chosen above once, at import.
    from gateway.client.serve import serve

    return uvloop.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
