"""`tunnel-gateway --quick [--token T] [--domain D | --public-url U]`: a gateway with
no config file that allows quick tunnels. The config it runs by is written to a
private file (0600 in a 0700 folder, removed at exit) so that reloads and the
supervisor work as with any file; the token (given, else generated) and the exact
client command are printed at start."""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import tempfile
from typing import Callable

from gateway.config import GatewayConfig
from gateway.quick import DEFAULT_PUBLIC_URL

__all__ = ["add_quick_arguments", "quick_config_file", "quick_banner"]


def add_quick_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quick tunnels (tunnel-client http PORT)")
    g.add_argument("--quick", action="store_true",
                   help="run with no config file, allowing quick tunnels; prints the token and the client command")
    g.add_argument("--token", default=None, help="with --quick: the token quick clients give (default: a new one)")
    g.add_argument("--domain", default=None,
                   help="quick tunnels' public URLs are http://NAME.DOMAIN (over [quick] domain)")
    g.add_argument("--public-url", default=None,
                   help=f"quick tunnels' public URL template (default {DEFAULT_PUBLIC_URL}; over [quick] public_url)")


def quick_config_file(args: argparse.Namespace) -> tuple[str, Callable[[], None]]:
    """Write the --quick config; returns its path and what removes it. Sets args.token."""
    args.token = args.token or secrets.token_hex(16)  # hex: a token that never reads as a flag
    folder = tempfile.mkdtemp(prefix="tunnel-gateway-quick-")  # 0700
    path = os.path.join(folder, "gateway.toml")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        # tomllib reads what json.dumps writes for a plain string.
        fh.write(f"# written by tunnel-gateway --quick\n[quick]\ntokens = [{json.dumps(args.token)}]\n")
    return path, lambda: shutil.rmtree(folder, ignore_errors=True)


def quick_banner(config: GatewayConfig, token: str | None) -> str:
    """What --quick prints at start: where tunnels appear and the client command."""
    assert config.quick is not None
    host = config.host if config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    server = f"[{host}]:{config.tunnel_port}" if ":" in host else f"{host}:{config.tunnel_port}"
    lines = ["Quick tunnels are on.",
             f"  Public URLs:  {config.quick.url('NAME', config.http_port)}"]
    if token:
        lines.append(f"  Token:        {token}")
        lines.append(f"  Expose a local port (here 3000):  tunnel-client http 3000 --server {server} --token={token}")
    return "\n".join(lines)
