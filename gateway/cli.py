"""`tunnel-gateway`: the command line. Flags mirror the [gateway] settings."""
from __future__ import annotations

import argparse
import os
import sys

from gateway import __version__
from gateway.config import GATEWAY_SETTINGS, load_gateway_config
from gateway.settings import ConfigError, add_arguments

__all__ = ["main", "build_parser"]

EXIT_BAD_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunnel-gateway", description="Tunnel gateway: HTTP entry, tunnel endpoint, admin.")
    p.add_argument("--config", "-c", default="conf/gateway.toml", help="TOML config file (default: conf/gateway.toml)")
    p.add_argument("--version", action="version", version=f"tunnel-gateway {__version__}")
    add_arguments(p, GATEWAY_SETTINGS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_gateway_config(args.config, args)
    except ConfigError as exc:
        print(f"tunnel-gateway: bad config: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    from gateway.supervisor import Supervisor

    workers = config.workers or os.cpu_count() or 1
    return Supervisor(config, workers, args).run()


if __name__ == "__main__":
    sys.exit(main())
