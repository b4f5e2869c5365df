"""The gateway's own ports: two settings naming one port is a config error,
and a port something already listens on stops the start, though the
workers bind theirs with SO_REUSEPORT (which would let a second gateway, or
its admin port, share a port silently). Plain sockets only: the supervisor's
process uses this before it spawns anyone.

How the start claims its ports (`claim_ports`): for each one, a socket bound
*without* SO_REUSEPORT, so the bind fails (EADDRINUSE) when anything listens
there, a gateway included. Without SO_REUSEADDR first; when that fails, once
more with it: SO_REUSEADDR passes the TIME_WAIT connections a process that
just died leaves behind (a restart right after a crash works) and never a
listener. Once bound, the socket drops SO_REUSEADDR and takes SO_REUSEPORT,
and is kept (never listened on: the kernel hands connections only to
listening sockets) for the gateway's life: its own workers' SO_REUSEPORT
binds succeed beside it, while another gateway's check, started at the same
moment, fails on it. So there is no window between the check and the
workers' binds in which a second gateway gets in. The peer port (with
`cluster`) is the exception: ZeroMQ cannot bind beside a socket, so the
claimed socket itself listens and the router takes it (`listen_for_peers`).
"""
from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any, Mapping

__all__ = ["PORT_SETTINGS", "PortUnavailable", "port_clash", "claim_ports", "hosts_overlap", "is_wildcard",
           "listen_for_peers"]

# Each port setting and the setting naming the address it listens on. peer_port
# counts only with `cluster` set (a single host opens no peer port).
PORT_SETTINGS: tuple[tuple[str, str], ...] = (
    ("http_port", "host"), ("grpc_port", "host"), ("tunnel_port", "host"), ("admin_port", "admin_host"),
    ("peer_port", "host"),
)
# Connections from other nodes' routers waiting to be accepted (a handful of nodes).
PEER_BACKLOG = 128


class PortUnavailable(OSError):
    """A configured port that cannot be claimed: something listens on it (or the address is not local)."""

    def __init__(self, key: str, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot claim port {port} ({key}, on {host or '*'}): {reason}")
        self.key = key
        self.host = host
        self.port = port


def is_wildcard(host: str) -> bool:
    """An address that listens on every interface ("", "*", 0.0.0.0, ::)."""
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def hosts_overlap(a: str, b: str) -> bool:
    """Could listeners on `a` and `b` take the same connections? A host name
    (not resolved here) counts as overlapping anything."""
    if a.lower() == b.lower() or is_wildcard(a) or is_wildcard(b):
        return True
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return True


def _configured(settings: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """(key, host, port) of every port the gateway will open: not 0, and peer_port only with cluster."""
    out = []
    for key, host_key in PORT_SETTINGS:
        port = settings.get(key, 0)
        if port and (key != "peer_port" or settings.get("cluster")):
            out.append((key, settings.get(host_key, ""), port))
    return out


def port_clash(settings: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first two port settings naming the same port on overlapping
    addresses, or None. Port 0 is off and never clashes."""
    seen: list[tuple[str, str, int]] = []
    for key, host, port in _configured(settings):
        for other, other_host, other_port in seen:
            if other_port == port and hosts_overlap(host, other_host):
                return other, key
        seen.append((key, host, port))
    return None


def _bind_exclusive(host: str, port: int) -> socket.socket:
    family, kind, proto, _name, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    for reuse_address in (False, True):
        sock = socket.socket(family, kind, proto)
        try:
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or reuse_address:
                raise
            continue
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock
    raise AssertionError("unreachable")


def claim_ports(settings: Mapping[str, Any]) -> dict[str, socket.socket]:
    """Claim every configured port (see the module): {setting: its socket};
    PortUnavailable names the first one in use. Keep the sockets open while the
    gateway runs."""
    held: dict[str, socket.socket] = {}
    try:
        for key, host, port in _configured(settings):
            try:
                held[key] = _bind_exclusive(host, port)
            except OSError as exc:
                raise PortUnavailable(key, host, port, exc.strerror or str(exc)) from None
    except BaseException:
        for sock in held.values():
            sock.close()
        raise
    return held


def listen_for_peers(sock: socket.socket) -> socket.socket:
    """The claimed peer_port socket becomes the router's listener (ZeroMQ takes it
    as it is, ZMQ_USE_FD): the claim is the listener, so no other process can take
    the port between the check and the router's start, nor share it (SO_REUSEPORT
    off: no worker binds beside this one). A respawned router takes it over."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
    # Accepted connections inherit SO_REUSEADDR: without it, those a killed node
    # leaves (FIN_WAIT2, TIME_WAIT) would stop its restart's claim for a minute. It
    # lets no one bind beside this socket while it listens.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.listen(PEER_BACKLOG)
    return sock
