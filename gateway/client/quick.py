"""`tunnel-client http PORT`: a quick tunnel in one line. The client asks the gateway
for a public name (`--name`, else a random one it keeps for its whole run, so a
reconnect gets the same URL) and every request to that name goes to PORT (or
HOST:PORT, or a base URL). No local egress entry unless `--local-port` is given;
the status port (and inspector) on the first free port from 4040; a console that
prints the public URL, then one line a request, as ngrok's does. Every other
client flag works as usual."""
from __future__ import annotations

import argparse
import socket
import sys
import time
from typing import TextIO

from gateway.quick import random_name, valid_name

__all__ = ["QUICK_GROUP", "Console", "first_free_port", "prepare_http_args", "upstream_of"]

QUICK_GROUP = "quick"  # what a quick client's HELLO names as its group (the gateway makes quick.NAME)
INSPECTOR_FROM = 4040


def upstream_of(target: str) -> str:
    """The upstream a quick tunnel forwards to: PORT, HOST:PORT or a base URL."""
    if target.isdigit():
        port, host = int(target), "127.0.0.1"
    elif "://" in target:
        scheme, _, rest = target.partition("://")
        if scheme not in ("http", "https") or not rest or "/" in rest.rstrip("/"):
            raise ValueError(f"{target!r} is not a base URL like http://127.0.0.1:3000")
        return target.rstrip("/")
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise ValueError(f"{target!r} is not PORT, HOST:PORT or a URL")
        port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return f"http://{host}:{port}"


def first_free_port(start: int = INSPECTOR_FROM, host: str = "127.0.0.1", tries: int = 100) -> int:
    """The first port from `start` nothing listens on (ngrok's inspector habit: 4040, 4041, ...)."""
    for port in range(start, start + tries):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {start}-{start + tries - 1} on {host}")


def prepare_http_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `tunnel-client http ...` with the client's own parser plus the target and
    --name, and fill in what a quick tunnel means (exits 2 on a usage error)."""
    parser.prog = "tunnel-client http"
    parser.description = "Expose a local port through the gateway in one line: a public URL, a route to PORT."
    parser.add_argument("target", metavar="PORT", help="local port, HOST:PORT or base URL to expose")
    parser.add_argument("--name", default="", help="the public name (one DNS label; default: a random one)")
    args = parser.parse_args(argv)
    try:
        args.quick_upstream = upstream_of(args.target)
    except ValueError as exc:
        parser.error(str(exc))
    if args.name and not valid_name(args.name):
        parser.error(f"--name {args.name!r}: one DNS label, lower case (a-z, 0-9, inner -)")
    args.quick_name = args.name or random_name()
    for key, value in (("group", QUICK_GROUP), ("local_port", 0), ("log_level", "warning")):
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if getattr(args, "admin_port", None) is None:
        args.admin_port = first_free_port()
    return args


class Console:
    """What a person running `tunnel-client http` reads: where the tunnel is, then
    one line a request (time, method, path, status, duration)."""

    def __init__(self, upstream: str, inspector: str, out: TextIO | None = None) -> None:
        self.upstream = upstream
        self.inspector = inspector
        self.out = out or sys.stdout
        self.url = ""

    def forwarding(self, url: str) -> None:
        if url and url != self.url:
            self.url = url
            print(f"Forwarding {url} -> {self.upstream}", file=self.out)
            if self.inspector:
                print(f"Inspector  {self.inspector}", file=self.out)
            self.out.flush()

    def request(self, method: str, path: str, status: int, duration: float) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"{stamp} {method:<7} {path:<40} {status or '-':>3} {duration * 1000:8.1f} ms", file=self.out,
              flush=True)
