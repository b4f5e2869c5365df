"""The tunnel endpoint's side of quick tunnels (gateway/quick.py): whether a HELLO
asking for one may have it, under which name, and what its client is told.

Two steps, so that nothing about names is told to a caller without a token: the
group a HELLO names (before the token check), then, once authenticated, whether
the name is free (on every worker and, in a fleet, every node), no configured
route takes its host, and the gateway holds fewer than `max_tunnels`."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gateway.quick import QUICK_PREFIX, client_config, group_of, random_name, valid_name
from gateway.rules import first_match, host_matches
from gateway.settings import ConfigError
from gateway.workers.registry import stream_info

if TYPE_CHECKING:
    from gateway.config import GatewayConfig, GroupSpec
    from gateway.groupconfig import GroupConfig
    from gateway.tunnel import tunnel_pb2 as pb
    from gateway.tunnel.stream import TunnelStream
    from gateway.workers.routing import Routing

__all__ = ["QuickRefused", "quick_group", "admit_quick", "holders", "settle_quick"]

log = logging.getLogger("gateway.worker")


class QuickRefused(Exception):
    """A quick tunnel refused: `code` for WELCOME, the message for the client's user."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def quick_group(hello: "pb.Hello", cfg: "GatewayConfig") -> "GroupSpec":
    """The group of the quick tunnel `hello` asks for (a random free-looking name when it names none)."""
    if cfg.quick is None:
        raise QuickRefused("quick_disabled", "this gateway does not allow quick tunnels (no [quick] table)")
    name = hello.quick_name or random_name()
    if not valid_name(name):
        raise QuickRefused("bad_name", f"{name!r} is not a name: one DNS label, lower case (a-z, 0-9, inner -)")
    return cfg.quick.spec(name)


def admit_quick(spec: "GroupSpec", hello: "pb.Hello", cfg: "GatewayConfig", routing: "Routing") -> "GroupConfig":
    """The config the quick tunnel's client gets; raises QuickRefused when the name is taken
    by another client or a configured route, or the gateway is full."""
    assert cfg.quick is not None
    name = spec.name[len(QUICK_PREFIX):]
    host = cfg.quick.host(name)
    # Any route naming this host, whatever its path, methods or headers, takes it: a quick
    # tunnel would get the requests it leaves over. A route for every host leaves it nothing.
    if any(r.host and host_matches(r.host, host) for r in cfg.routes) or first_match(
            cfg.routes, host, "/", "GET", {}) is not None:
        raise QuickRefused("name_taken", f"{host} is served by a configured route; choose another name")
    # A name is held by a process (its HELLO's random instance), not by a client id, which
    # anyone may claim: another process, whatever id it gives, is refused.
    held_by = holders(routing, group_of(name))
    if held_by and (not hello.instance or held_by != {(hello.client_id, hello.instance)}):
        raise QuickRefused("name_taken", f"the name {name!r} is in use by another tunnel; choose another name")
    held = sum(1 for g in routing.visible_streams() if g.startswith(QUICK_PREFIX))
    if not held_by and held >= cfg.quick.max_tunnels:
        raise QuickRefused("overloaded", f"this gateway holds its maximum of {cfg.quick.max_tunnels} quick tunnels")
    try:
        return client_config(hello.quick_upstream, "HELLO")
    except ConfigError as exc:
        raise QuickRefused("bad_request", f"quick tunnel upstream: {exc}") from None


def holders(routing: "Routing", group: str) -> set[tuple[str, str]]:
    """(client id, process instance) of every stream of `group` the worker knows of:
    its own, other workers', other nodes' (draining ones too: they still hold it)."""
    out = {(s.peer_id, getattr(s, "instance", "")) for s in routing.registry if s.group == group}
    link = routing.link
    if link is not None and link.router_ok:
        for info in [*link.table.values(), *link.remote.values()]:
            out |= {(c["client_id"], c.get("instance", "")) for c in info.get("clients", ()) if c["group"] == group}
    return out


def settle_quick(routing: "Routing", stream: "TunnelStream") -> None:
    """Two processes admitted to one quick name at once (on two workers or nodes, before
    either saw the other): the later, by connection time then instance, is sent away
    (GOAWAY name_taken; its client's HELLO is then refused and it exits saying why)."""
    if stream.closed or stream.draining:
        return
    mine = (stream.connected_at, getattr(stream, "instance", ""))
    rows = [stream_info(s, routing.index) for s in routing.registry if s.group == stream.group and s is not stream]
    link = routing.link
    if link is not None and link.router_ok:
        rows += [c for info in [*link.table.values(), *link.remote.values()]
                 for c in info.get("clients", ()) if c["group"] == stream.group]
    if any(c.get("instance", "") != mine[1] and (c.get("connected_at", 0.0), c.get("instance", "")) < mine
           for c in rows):
        log.warning("quick name held by another process too: this later one goes",
                    extra={"group": stream.group, "client_id": stream.peer_id})
        routing.spawn(stream.goaway("name_taken", routing.config.shutdown_grace))
