"""Where a request goes: the one place that decides.

`Routing` owns this worker's client streams (the registry), its view of the
other workers' streams (the shard table the router broadcasts, through the
link), the balancer and the limit gates, and the current config. A request
for a group goes to a stream this worker owns, else over a channel to the
worker that owns the chosen one: another worker of this node, else (in a
fleet) a worker of another node, "NODE/wI". The entries ask it for a stream;
the tunnel endpoint adds and removes streams through it; the router link
hands it the requests other workers (of any node) send.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Mapping, Protocol

from gateway.balance import Balancer, Candidate
from gateway.limits import LimitGate, Limits
from gateway.quick import name_of_group
from gateway.router.envelope import remote_identity, worker_identity
from gateway.rules import first_match
from gateway.tunnel import frames
from gateway.tunnel.exchange import InboundExchange
from gateway.tunnel.forward import relay_exchange
from gateway.tunnel.stream import StreamLimits, TunnelStream
from gateway.rollout.plan import Book
from gateway.workers.registry import StreamRegistry, stream_info

if TYPE_CHECKING:
    from gateway.config import GatewayConfig, GroupSpec

__all__ = ["Routing", "PeerLink"]

log = logging.getLogger("gateway.worker")

# Gates kept before the idle ones of quick names gone are dropped (times 4).
QUICK_GATES = 256
# A channel to another worker carries the requests of all its clients at once.
CHANNEL_INFLIGHT_FACTOR = 16


class PeerLink(Protocol):
    """What routing needs of the link to the other workers (`RouterLink`)."""

    router_ok: bool
    table: dict[str, dict[str, Any]]
    remote: dict[str, dict[str, Any]]
    channels: dict[bytes, TunnelStream]
    frames_in: int
    frames_out: int

    def channel(self, peer: bytes) -> TunnelStream: ...

    def announce_soon(self) -> None: ...

    async def until_table(self, check: Callable[[dict[str, dict[str, Any]]], bool], timeout: float) -> bool: ...

    async def send_command(self, worker: str, command: dict) -> None: ...


class Routing:
    def __init__(self, config: "GatewayConfig", *, worker: int, workers: int,
                 spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task]) -> None:
        self.config = config
        self.index = worker
        self.workers = workers
        self.registry = StreamRegistry()
        self.balancer = Balancer()
        self.link: PeerLink | None = None
        self.spawn = spawn  # a background task the worker owns (cancelled when it stops)
        self._gates: dict[tuple[str, str], LimitGate] = {}
        # Staged rollouts: which config version each client runs (kept by gateway/workers/rollouts.py).
        self.book = Book()
        self.book_ready = asyncio.Event()  # the book is known (a fleet's: from the registry, or after a wait)

    def attach(self, link: PeerLink) -> None:
        """Reach other workers' streams through `link` (with more than one worker)."""
        self.link = link

    def stream_limits(self, *, channel: bool = False) -> StreamLimits:
        """The limits of a client stream, or of a channel to another worker
        (no heartbeat: the router tells when a worker is lost)."""
        cfg = self.config
        return StreamLimits(
            max_inflight=cfg.max_inflight_per_stream * (CHANNEL_INFLIGHT_FACTOR if channel else 1),
            # A channel's two ends each take their own setting, not a value the other sent (as a
            # client does): a default they share, kept across versions (docs/performance.md).
            window=cfg.channel_window if channel else cfg.stream_window,
            chunk_size=cfg.chunk_size,
            max_batch_bytes=cfg.max_batch_bytes,
            max_queue_bytes=cfg.max_queue_bytes,
            heartbeat_interval=0 if channel else cfg.heartbeat_interval,
        )

    # -- choosing a stream -----------------------------------------------------

    def candidates(self, group: str, local_only: bool = False) -> list[Candidate]:
        """Streams of `group` a request could go to: this worker's, other workers', other nodes'.
        A draining node's streams only while the group has none on a serving node."""
        out = [Candidate(s.peer_id, self.index, s.inflight, s.peer_unhealthy, s) for s in self.registry.usable(group)]
        link = self.link
        if not local_only and link is not None and link.router_ok:
            for info in link.table.values():
                if info["worker"] == self.index:
                    continue
                for c in info["clients"]:
                    if c["group"] == group and not c["draining"]:
                        out.append(Candidate(c["client_id"], info["worker"], c["pending"] + c["serving"],
                                             frozenset(c.get("unhealthy", ()))))
            if link.remote:
                out += self._remote_candidates(link.remote, group, serving_only=bool(out))
        return out

    @staticmethod
    def _remote_candidates(rows: dict[str, dict[str, Any]], group: str, serving_only: bool) -> list[Candidate]:
        serving: list[Candidate] = []
        draining: list[Candidate] = []
        for info in rows.values():
            into = draining if info["node_state"] == "draining" else serving
            for c in info["clients"]:
                if c["group"] == group and not c["draining"]:
                    into.append(Candidate(c["client_id"], info["worker"], c["inflight"], frozenset(c["unhealthy"]),
                                          node=info["node"]))
        return serving if serving or serving_only else draining

    def choose(self, spec: "GroupSpec", *, authority: str, path: str, method: str, headers: Mapping[str, str],
               key: str | None, avoid: str = "", avoid_stream: TunnelStream | None = None,
               ) -> tuple[TunnelStream, str] | None:
        """(stream, client id) for a request to group `spec`: by its policy, its
        clients' health, preferring streams this worker owns; None if there is none.
        The stream is a client's, or a channel to the worker that owns the chosen one.
        `avoid`: a client whose tunnel just failed this request (a retry), taken
        only when the group has no other, and then rather not through `avoid_stream`,
        the stream (or channel to another worker) that failed."""
        candidates = self.candidates(spec.name)
        if avoid:
            others = [c for c in candidates if c.client_id != avoid]
            if not others and avoid_stream is not None:  # the same client, its connection elsewhere
                others = [c for c in candidates if (c.stream or self._channel_of(c)) is not avoid_stream]
            candidates = others or candidates
        upstream = None
        if any(c.unhealthy for c in candidates):
            # Which upstream the client will use, by the group's rules the gateway hands out.
            client_rule = first_match(spec.client.rules, authority, path.split("?", 1)[0], method, headers)
            upstream = client_rule.target if client_rule else None
        choice = self.balancer.pick(spec.name, spec.balance, candidates, upstream=upstream, key=key,
                                    prefer_remote=self.config.force_cross_worker)
        if choice is None:
            return None
        if choice.stream is not None:
            return choice.stream, choice.client_id
        assert self.link is not None  # remote candidates come only through the link
        return self.link.channel(self._peer_of(choice)), choice.client_id

    @staticmethod
    def _peer_of(c: Candidate) -> bytes:
        """The worker a remote candidate's stream is on: "wI", or "NODE/wI" on another node."""
        peer = worker_identity(c.worker)
        return remote_identity(c.node.encode(), peer) if c.node else peer

    def _channel_of(self, c: Candidate) -> TunnelStream | None:
        return self.link.channels.get(self._peer_of(c)) if self.link is not None else None

    async def serve_remote(self, ex: InboundExchange) -> None:
        """A request another worker sent: put it on one of our client streams."""
        group = ex.head.group
        # The origin chose the client (policy, health); keep to it while it is here. Its
        # streams picked as the balancer would (the one filling a gRPC message, else each
        # in turn), without a Candidate list for what is most often one client's two streams.
        target = ex.head.target_client
        streams = [s for s in self.registry.usable(group) if s.peer_id == target] if target else []
        if streams:
            stream = streams[0] if len(streams) == 1 else next((s for s in streams if s.filling_batch), None)
            if stream is None:
                stream = streams[self.balancer._next(f"{group}\0{target}", len(streams))]
            await relay_exchange(ex, stream)
            return
        pick = self.balancer.pick(group, "round_robin", self.candidates(group, local_only=True))
        if pick is None:
            ex.reset("no_client_available", f"worker {self.index} holds no stream of group {group!r}")
            return
        await relay_exchange(ex, pick.stream)

    def limit_gate(self, kind: str, name: str, limits: Limits) -> LimitGate | None:
        """The live gate of a group's or a rule's limits (None when it has none)."""
        if limits.empty:
            return None
        key = (kind, name)
        gate = self._gates.get(key)
        if gate is None or gate.limits != limits:
            if gate is None and name_of_group(name) is not None and len(self._gates) > 4 * QUICK_GATES:
                # Quick names come and go: forget the idle gates of names gone (a rate bucket
                # starting full again is all an idle name loses).
                held = self.registry.groups()
                self._gates = {k: g for k, g in self._gates.items()
                               if name_of_group(k[1]) is None or g.inflight or k[1] in held}
            gate = self._gates[key] = LimitGate(limits, self.workers)
        return gate

    # -- this worker's streams -------------------------------------------------

    def add_stream(self, stream: TunnelStream, key: tuple | None = None) -> None:
        """A client stream is ready to take requests; `key` is its identity and
        connection index (`registry.connection_key`)."""
        old = self.registry.add(stream, key)
        self.streams_changed()
        if old is not None:
            # The newest connection of one identity wins; the old one goes (a duplicate process stops).
            self._replace(old, getattr(stream, "remote", ""), getattr(stream, "instance", ""))
        self._replace_elsewhere(stream)

    def _replace(self, old: TunnelStream, newer_remote: str, newer_instance: str = "") -> None:
        extra = {"group": old.group, "client_id": old.peer_id, "connection": old.label, "remote": newer_remote,
                 "replaced_remote": getattr(old, "remote", "")}
        if newer_instance and getattr(old, "instance", "") == newer_instance:
            # The same process: a move (or a reconnect after it lost the old one). Nothing new goes
            # to the old stream; it still takes what the client sends until the client's own GOAWAY
            # (a drain now would refuse what it sent before it saw the new WELCOME), or its heartbeat ends it.
            log.info("a client moved a connection", extra=extra)
            self.remove_stream(old)
            return
        log.warning("duplicate client identity: a newer connection replaces an older one", extra=extra)
        self.spawn(old.goaway("replaced_by_newer_connection", self.config.shutdown_grace))

    def _replace_elsewhere(self, stream: TunnelStream) -> None:
        """An older stream of the same identity and connection on another worker of
        this node, or on another node (by the shard table and the fleet's rows):
        that worker is told to replace it. On another node only when it is another
        client process's: a client moving a connection between nodes opens the new
        stream before it lets the old one go (make-before-break)."""
        link = self.link
        if link is None or not link.router_ok:
            return
        certificate = list(getattr(stream, "certificate", ()))
        instance = getattr(stream, "instance", "")
        command = {"op": "replace", "group": stream.group, "connection": stream.label, "certificate": certificate,
                   "before": stream.connected_at, "remote": getattr(stream, "remote", ""), "instance": instance}

        def older(c: Mapping[str, Any]) -> bool:
            return (c["group"] == stream.group and c["connection"] == stream.label and not c["draining"]
                    and list(c.get("certificate", [])) == certificate and c.get("connected_at", 0) < stream.connected_at)

        for info in link.table.values():
            if info.get("worker") != self.index and any(older(c) for c in info.get("clients", ())):
                self.spawn(self._send_command(link, f"w{info['worker']}", command))
        if not instance:
            return  # a client too old to say which process it is: its moves would look like duplicates
        for info in link.remote.values():
            if any(older(c) and c.get("instance") and c["instance"] != instance for c in info["clients"]):
                self.spawn(self._send_command(link, f"{info['node']}/w{info['worker']}", {**command, "from_node": True}))

    async def _send_command(self, link: PeerLink, worker: str, command: dict) -> None:
        try:
            await link.send_command(worker, command)
        except Exception as exc:  # a worker gone meanwhile: its streams went with it
            log.warning("cannot send a command to worker %s: %s", worker, exc, extra={"command": command})

    def replace(self, command: Mapping[str, Any]) -> int:
        """Another worker holds a newer connection of this identity: ours of it goes."""
        n = 0
        for s in list(self.registry):
            if (s.group == command.get("group") and s.label == command.get("connection") and not s.draining
                    and list(getattr(s, "certificate", ())) == command.get("certificate", [])
                    and s.connected_at < command.get("before", 0)
                    # From another node, the same process's stream is the one it is moving (see above).
                    and not (command.get("from_node") and getattr(s, "instance", "") == command.get("instance"))):
                self._replace(s, command.get("remote", ""), command.get("instance", ""))
                n += 1
        return n

    async def heard(self, stream: TunnelStream, timeout: float) -> bool:
        """Wait until every worker of this node can route to `stream`: the router's table has it
        in this worker's row and every other worker's row says it sees its group; False when
        that did not come within `timeout`."""
        link = self.link
        if link is None or not link.router_ok:
            return False
        me = worker_identity(self.index).decode()
        label, since, group = stream.label, stream.connected_at, stream.group

        def everyone_sees_it(table: dict[str, dict[str, Any]]) -> bool:
            clients = table.get(me, {}).get("clients", ())
            if not any(c.get("connection") == label and c.get("connected_at") == since for c in clients):
                return False
            return all(row.get("sees", {}).get(group) for key, row in table.items()
                       if key != me and not row.get("stopping"))

        return await link.until_table(everyone_sees_it, timeout)

    def remove_stream(self, stream: TunnelStream) -> None:
        self.registry.remove(stream)
        self.streams_changed()

    def streams_changed(self) -> None:
        """Tell the router at once, not at the next heartbeat."""
        if self.link is not None:
            self.link.announce_soon()

    def drain(self, command: Mapping[str, Any]) -> int:
        """Send GOAWAY to this worker's streams that `command` selects (client_id,
        connection, limit); returns how many."""
        n = 0
        limit = command.get("limit")
        for s in list(self.registry):
            if s.draining:
                continue
            if "client_id" in command and s.peer_id != command["client_id"]:
                continue
            if "connection" in command and s.label != command["connection"]:
                continue
            if "group" in command and s.group != command["group"]:
                continue
            if limit is not None and n >= limit:
                break
            self.spawn(s.goaway("drain", self.config.shutdown_grace))
            n += 1
        if n:
            self.streams_changed()
        log.info("drained streams", extra={"count": n, "command": dict(command)})
        return n

    def run_command(self, command: Mapping[str, Any]) -> int:
        """An admin command sent to this worker; returns how many streams it touched."""
        op = command.get("op")
        if op == "replace":
            return self.replace(command)
        return self.drain(command) if op == "drain" else 0

    def apply_config(self, new: "GatewayConfig") -> int:
        """Route by `new` from now on; push each client the config its group (or
        the rollout it is part of) now gives it, and send away clients of removed
        groups. Requests in flight finish as they started. Returns how many clients got a push."""
        self.config = new
        for s in list(self.registry):
            if new.groups.get(s.group) is None and not self._is_quick(s.group):
                self.spawn(s.goaway("group_removed", new.shutdown_grace))
        return self.sync_configs()

    def _is_quick(self, group: str) -> bool:
        # A quick tunnel: its config is the upstream its client named, never pushed.
        return self.config.quick is not None and name_of_group(group) is not None

    def client_config(self, spec: "GroupSpec", client_id: str) -> tuple[str, bytes]:
        """(version, JSON) of the config `client_id` of the group runs: the file's, or a rollout's side."""
        assigned = self.book.assigned(spec.name, client_id)
        if assigned is not None:
            return assigned[0], assigned[1].encode()
        return spec.client.version, spec.client.to_json()

    def sync_configs(self) -> int:
        """Push a CONFIG to each stream whose client should run another version than
        the one last sent (the client answers with the version it applied, see
        TunnelEndpoint); returns how many."""
        pushed = 0
        for s in list(self.registry):
            spec = self.config.groups.get(s.group)
            if spec is None or s.draining:
                continue
            version, raw = self.client_config(spec, s.peer_id)
            if version != s.config_sent:
                s.push(frames.config(version, raw))
                s.config_sent = version
                pushed += 1
        return pushed

    def config_versions(self) -> dict[str, str]:
        return {g: spec.client.version for g, spec in self.config.groups.items()}

    # -- what the router and the admin port are told ---------------------------

    def visible_streams(self) -> dict[str, int]:
        """Streams by group this worker can reach, its own and through the router."""
        seen = dict(self.registry.groups())
        if self.link is not None and self.link.router_ok:
            for info in self.link.table.values():
                if info.get("worker") != self.index:
                    for g, n in info.get("streams", {}).items():
                        seen[g] = seen.get(g, 0) + n
        return seen

    def streams_report(self) -> dict[str, Any]:
        """This worker's part of the shard table: its streams and what is in flight."""
        clients = [stream_info(s, self.index) for s in self.registry]
        channels = list(self.link.channels.values()) if self.link is not None else []
        return {
            "streams": self.registry.groups(),
            "clients": clients,
            "pending": sum(c["pending"] for c in clients) + sum(len(ch.pending) for ch in channels),
            "serving": sum(c["serving"] for c in clients) + sum(len(ch.serving) for ch in channels),
            "inflight": sum(c["pending"] + c["serving"] for c in clients),
            "requests_served": sum(c["requests_originated"] for c in clients),
            "cross_frames_in": self.link.frames_in if self.link is not None else 0,
            "cross_frames_out": self.link.frames_out if self.link is not None else 0,
            "sees": self.visible_streams(),
            # What frames this worker's code reads (channels to it use them; older code lacks the key).
            "capabilities": [frames.HEADER_FIELDS],
        }
