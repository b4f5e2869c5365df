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
dropped with a log line.

CURVE (`cluster_secret_key` and `cluster_public_keys` set). The ROUTER is a
CURVE server and each DEALER a CURVE client of the key the target's record
carries (`curve_key`). A ZAP responder of our own (inproc://zeromq.zap.01 in
the router's context, polled by the broker's loop: no thread, no directory
of certificate files as zmq.auth wants) admits only listed keys, so an
unlisted node's handshake fails before any frame of it is read; its refusal
is logged once per address. A message's sender must also hold the key its
node's record names (ZAP's User-Id), so a listed node cannot speak for
another. A node that cannot link with this one (no key, or a key not listed,
or keys while this node has none) is never dialled, and logged once."""
from __future__ import annotations

import logging
import time
from typing import Mapping

import orjson
import zmq
from zmq.utils import z85

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
# The ZAP endpoint libzmq asks (RFC 27); one handler per context.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
# (address, key) pairs whose refusal was logged: bounded, as anyone may knock.
REFUSED_LOG_LIMIT = 1000


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
    def __init__(self, own: NodeRecord, *, bind: str, listener_fd: int | None = None, hwm: int = 100_000,
                 secret_key: str = "", public_keys: tuple[str, ...] = ()) -> None:
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
        # CURVE: own.curve_key is this node's public key; empty keys: plaintext.
        self.secret_key = secret_key
        self.allowed = frozenset(public_keys)
        self.zap: zmq.Socket | None = None
        self._refused_logged: set[tuple[str, str]] = set()

    @property
    def curve(self) -> bool:
        return bool(self.secret_key)

    def bind(self, ctx: zmq.Context) -> zmq.Socket:
        self._ctx = ctx
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted node reconnects under the same id
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        if self.curve:
            # The handler first: a client that connects before it exists would be let in unchecked.
            self.zap = ctx.socket(zmq.REP)
            self.zap.setsockopt(zmq.LINGER, 0)
            self.zap.bind(ZAP_ENDPOINT)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret_key.encode())
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.own.curve_key.encode())
            sock.setsockopt(zmq.ZAP_DOMAIN, b"tunnel-peers")
        if self.listener_fd is not None:
            # The port the gateway claimed at start, already listening (gateway/ports.py).
            sock.setsockopt(zmq.USE_FD, self.listener_fd)
        try:
            sock.bind(self.bind_address)
        except zmq.ZMQError:
            sock.close(0)  # else the context's term() waits for it forever
            if self.zap is not None:
                self.zap.close(0)
            raise
        self.router = sock
        log.info("listening for peer nodes", extra={"endpoint": self.bind_address, "node_id": self.own.node_id,
                                                     "curve": self.curve})
        return sock

    def authenticate(self) -> None:
        """Answer libzmq's ZAP requests: a CURVE client is let in when its key is listed
        (its User-Id is then the key, checked against its node's record in `receive`)."""
        assert self.zap is not None
        for _ in range(100):
            try:
                request = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            _version, request_id, _domain, address, _identity, mechanism, *credentials = request
            key = z85.encode(credentials[0]).decode() if mechanism == b"CURVE" and credentials else ""
            # Only the peer ROUTER is a CURVE server in this context; any other socket's NULL
            # handshake is not ours to refuse.
            ok = mechanism != b"CURVE" or key in self.allowed
            if not ok:
                self._log_refused(address.decode(errors="replace"), key)
            self.zap.send_multipart([b"1.0", request_id, b"200" if ok else b"400",
                                     b"OK" if ok else b"key not in cluster_public_keys", key.encode(), b""])

    def _log_refused(self, address: str, key: str) -> None:
        # Once per address and key: a refused node redials every second; by the key too,
        # as nodes on one host (or behind one NAT) share an address.
        if (address, key) in self._refused_logged:
            return
        if len(self._refused_logged) >= REFUSED_LOG_LIMIT:
            self._refused_logged.clear()
        self._refused_logged.add((address, key))
        log.warning("refused a peer link: its CURVE key %s... is not in cluster_public_keys", key[:8],
                    extra={"peer": address, "curve_key": key[:8]})

    def _unlinkable(self, rec: NodeRecord) -> str | None:
        """Why this node and `rec`'s cannot link (each side says it), or None."""
        if not self.curve:
            return "it uses CURVE keys and this node has none (cluster_secret_key)" if rec.curve_key else None
        if not rec.curve_key:
            return "its peer links are plaintext (no cluster_secret_key) and this node's use CURVE"
        if rec.curve_key not in self.allowed:
            return f"its CURVE key {rec.curve_key[:8]}... is not in cluster_public_keys"
        return None

    def _peer(self, rec: NodeRecord) -> Peer:
        why = self._unlinkable(rec)
        if why is not None:
            log.warning("not linking with peer node: %s", why, extra={"peer_node": rec.node_id, "peer": rec.peer})
        return Peer(rec, self._dealer(rec, connect=why is None))

    def _dealer(self, rec: NodeRecord, connect: bool = True) -> zmq.Socket:
        """A DEALER to `rec`'s node; unconnected when they cannot link (its sends fail
        with Again at once, and the node never becomes live)."""
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
        if not connect:
            return sock
        if self.curve:
            sock.setsockopt(zmq.CURVE_SERVERKEY, rec.curve_key.encode())
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.own.curve_key.encode())
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret_key.encode())
        sock.connect(rec.peer)
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
                self.peers[node_id] = self._peer(rec)
            elif (rec.started, rec.peer, rec.curve_key) != (peer.record.started, peer.record.peer,
                                                            peer.record.curve_key):
                peer.dealer.close(0)
                lost.append((peer, "restarted" if rec.peer == peer.record.peer else "moved"))
                self.peers[node_id] = self._peer(rec)
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
            peer.dealer = self._dealer(peer.record, connect=self._unlinkable(peer.record) is None)
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
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=not self.curve)
            except zmq.Again:
                break
            key = ""
            if self.curve:  # the key ZAP admitted, to hold the sender to its node's record
                key = frames[0].get("User-Id")
                frames = [f.bytes for f in frames]
            msg: list[bytes] = frames  # type: ignore[assignment]
            try:
                node, dest, src, kind, payload = env.from_peer(msg)
            except ValueError as exc:
                log.warning("dropped a bad envelope from a peer node: %s", exc)
                continue
            peer = self.peers.get(node.decode(errors="replace"))
            if peer is None:
                self._unknown(node)
            elif self.curve and key != peer.record.curve_key:
                self._unknown(node, f"holds CURVE key {key[:8]}..., not its record's")
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

    def _unknown(self, node: bytes, why: str = "not in the registry") -> None:
        now = time.monotonic()
        if now - self._unknown_logged.get(node, -UNKNOWN_LOG_EVERY) >= UNKNOWN_LOG_EVERY:
            if len(self._unknown_logged) > 1000:  # ids are the sender's say: keep the book bounded
                self._unknown_logged.clear()
            self._unknown_logged[node] = now
            log.warning("dropped messages from a peer node: %s", why, extra={"peer_node": node.decode(errors="replace")})

    def close(self) -> None:
        for peer in self.peers.values():
            peer.dealer.close(0)
        self.peers.clear()
        if self.router is not None:
            self.router.close(0)
        if self.zap is not None:
            self.zap.close(0)
