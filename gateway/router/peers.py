"""This node's links to the other nodes of the fleet, as its router holds them
(ZeroMQ over TCP). One ROUTER, bound on `peer_port`, receives from every other
node's router; per other node one DEALER (ROUTING_ID: this node's id) sends to
its `peer` address. So each direction between two nodes has a connection of
its own: a router sends on its DEALERs and receives on its ROUTER only.

Liveness. Every PEER_HEARTBEAT_INTERVAL a router sends a HEARTBEAT, with its
start time, on each DEALER. A node is *live* from the first heartbeat of the
incarnation its registry record names (same `started`) until it is silent for
PEER_HEARTBEAT_INTERVAL x PEER_LIVENESS (2 s): then it is lost. Why these
numbers: the router ticks every 0.2 s, so 0.5 s is a few ticks and costs
nothing; between hosts a lost TCP segment is resent after Linux's minimum RTO
(200 ms), doubling, so three lost in a row (0.2 + 0.4 + 0.8 s) stay under 2 s;
and 2 s is well inside `node_ttl` (5 s), so a request to a dead node fails in
about 2 s instead of waiting for its lease to expire. Heartbeats share the TCP
connection with frame batches: a link that cannot carry one within 2 s is too
slow to serve requests anyway.

Only nodes in the registry copy are peers: messages from any other id are
dropped with a log line (until CURVE, the id is only what the peer says)."""
from __future__ import annotations

import logging
import time
from typing import Mapping

import orjson
import zmq

from gateway.cluster.record import NodeRecord
from gateway.router import envelope as env

__all__ = ["Peer", "PeerLinks", "PEER_HEARTBEAT_INTERVAL", "PEER_LIVENESS"]

log = logging.getLogger("gateway.router")

PEER_HEARTBEAT_INTERVAL = 0.5
PEER_LIVENESS = 4
# A peer's messages are drained at most this many a poll, so ticks (heartbeats) still happen under load.
DRAIN_LIMIT = 10_000
# Messages from an id not in the registry: logged at most this often per id.
UNKNOWN_LOG_EVERY = 10.0


class Peer:
    """Another node as this router sees it: its record (from the registry), the DEALER
    to it, when it was last heard, and the identities ("NODE/wI") this node's workers
    exchanged frames with (each is reported LOST when the node is lost)."""

    __slots__ = ("record", "dealer", "heard", "heard_at", "live", "identities")

    def __init__(self, record: NodeRecord, dealer: zmq.Socket) -> None:
        self.record = record
        self.dealer = dealer
        self.heard = 0.0  # monotonic time of its last heartbeat (of this incarnation)
        self.heard_at: float | None = None  # the same as unix time (/admin/cluster's last_seen)
        self.live = False
        self.identities: set[bytes] = set()

    @property
    def node_id(self) -> str:
        return self.record.node_id


class PeerLinks:
    def __init__(self, own: NodeRecord, *, bind: str, listener_fd: int | None = None, hwm: int = 100_000) -> None:
        self.own = own
        self.own_id = own.node_id.encode()
        self.bind_address = bind
        self.listener_fd = listener_fd
        self.hwm = hwm
        self.peers: dict[str, Peer] = {}
        self.router: zmq.Socket | None = None
        self.revived = False  # a peer became live since the caller last looked
        self._ctx: zmq.Context | None = None
        self._next_beat = 0.0
        self._beat = orjson.dumps({"started": own.started})
        self._unknown_logged: dict[bytes, float] = {}

    def bind(self, ctx: zmq.Context) -> zmq.Socket:
        self._ctx = ctx
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted node reconnects under the same id
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        if self.listener_fd is not None:
            # The port the gateway claimed at start, already listening (gateway/ports.py).
            sock.setsockopt(zmq.USE_FD, self.listener_fd)
        try:
            sock.bind(self.bind_address)
        except zmq.ZMQError:
            sock.close(0)  # else the context's term() waits for it forever
            raise
        self.router = sock
        log.info("listening for peer nodes", extra={"endpoint": self.bind_address, "node_id": self.own.node_id})
        return sock

    def _dealer(self, address: str) -> zmq.Socket:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.own_id)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        # What is sent while the connection is (re)made waits in the queue (a node just
        # heard from may not yet be connected this way); what waits for a node that is
        # lost or restarts goes with its DEALER (`expire`, `sync`).
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.connect(address)
        return sock

    def sync(self, nodes: Mapping[str, NodeRecord]) -> list[tuple[Peer, str]]:
        """Follow the registry copy: a DEALER to each new node; a node that left, restarted
        (another `started`) or moved (another `peer`) is lost: returned with why."""
        lost: list[tuple[Peer, str]] = []
        for node_id, rec in nodes.items():
            if node_id == self.own.node_id:
                continue
            peer = self.peers.get(node_id)
            if peer is None:
                self.peers[node_id] = Peer(rec, self._dealer(rec.peer))
            elif rec.started != peer.record.started or rec.peer != peer.record.peer:
                peer.dealer.close(0)
                lost.append((peer, "restarted" if rec.peer == peer.record.peer else "moved"))
                self.peers[node_id] = Peer(rec, self._dealer(rec.peer))
            else:
                peer.record = rec
        for node_id in [n for n in self.peers if n not in nodes]:
            peer = self.peers.pop(node_id)
            peer.dealer.close(0)
            lost.append((peer, "left"))
        return lost

    def heartbeat(self, now: float) -> None:
        if now < self._next_beat:
            return
        self._next_beat = now + PEER_HEARTBEAT_INTERVAL
        for peer in self.peers.values():
            try:
                peer.dealer.send_multipart(env.to_peer(b"", self.own_id, env.HEARTBEAT, self._beat), zmq.NOBLOCK)
            except zmq.Again:
                pass  # its queue is full (the node reads nothing): the next beat tries again

    def expire(self, now: float) -> list[Peer]:
        """Live peers silent too long: no longer live, their DEALER renewed (what waited
        in its queue is dropped); returned."""
        gone = [p for p in self.peers.values() if p.live and now - p.heard > PEER_HEARTBEAT_INTERVAL * PEER_LIVENESS]
        for peer in gone:
            peer.live = False
            peer.dealer.close(0)
            peer.dealer = self._dealer(peer.record.peer)
        return gone

    def send(self, peer: Peer, msg: list[bytes]) -> bool | None:
        """True when queued; None when the link's queue is full."""
        try:
            peer.dealer.send_multipart(msg, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return None

    def receive(self) -> list[tuple[Peer, bytes, bytes, bytes, bytes]]:
        """What peers sent, (peer, dest, src, kind, payload), heartbeats taken here."""
        assert self.router is not None
        out = []
        for _ in range(DRAIN_LIMIT):
            try:
                msg = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                node, dest, src, kind, payload = env.from_peer(msg)
            except ValueError as exc:
                log.warning("dropped a bad envelope from a peer node: %s", exc)
                continue
            peer = self.peers.get(node.decode(errors="replace"))
            if peer is None:
                self._unknown(node)
            elif kind == env.HEARTBEAT:
                self._heard(peer, payload)
            else:
                out.append((peer, dest, src, kind, payload))
        return out

    def _heard(self, peer: Peer, payload: bytes) -> None:
        try:
            started = orjson.loads(payload)["started"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("bad heartbeat from a peer node", extra={"peer_node": peer.node_id})
            return
        if started != peer.record.started:
            return  # another incarnation than the registry names: live once the record follows
        peer.heard, peer.heard_at = time.monotonic(), time.time()
        if not peer.live:
            peer.live = self.revived = True
            log.info("peer node reachable", extra={"peer_node": peer.node_id, "peer": peer.record.peer})

    def _unknown(self, node: bytes) -> None:
        now = time.monotonic()
        if now - self._unknown_logged.get(node, -UNKNOWN_LOG_EVERY) >= UNKNOWN_LOG_EVERY:
            if len(self._unknown_logged) > 1000:  # ids are the sender's say: keep the book bounded
                self._unknown_logged.clear()
            self._unknown_logged[node] = now
            log.warning("dropped messages from a node not in the registry",
                        extra={"peer_node": node.decode(errors="replace")})

    def close(self) -> None:
        for peer in self.peers.values():
            peer.dealer.close(0)
        self.peers.clear()
        if self.router is not None:
            self.router.close(0)
