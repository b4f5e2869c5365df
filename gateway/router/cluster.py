"""This node as one of a fleet, from its router's side: what the broker does
with destinations on other nodes, with what other nodes send, and what it tells
its workers and the registry.

* Forwarding: a worker's batch for "B/wI" goes over the DEALER to node B as
  [dest "wI", src "A/wJ", kind, payload]; B's router hands it to its wI with
  src "A/wJ", whose RouterLink opens a channel keyed "A/wJ" exactly as for a
  worker of its own node. A full queue on the way (the DEALER here, or B's
  worker's at B) answers FULL to the sending worker (503 `overloaded` for the
  requests in that batch); a destination that is not there answers LOST.
* Node loss: a node that goes silent (peers.py), leaves the registry or
  restarts is reported LOST to every local worker for every "B/wI" identity
  this node exchanged frames with (their requests fail at once with 502
  `tunnel_closed`), and its rows leave the table the workers get.
* What workers get: rows "B/wI" of the live nodes' clients (with TABLE), and
  the fleet view (FLEET) that /admin/cluster and the metrics show.
* What the registry gets: this node's streams by group and each worker's
  clients, from the shard table (see Registry.set_load for when it writes)."""
from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable, Iterable

import orjson
import zmq

from gateway.cluster.config import ClusterSettings
from gateway.cluster.record import ClientLoad, NodeRecord, WorkerLoad
from gateway.router import envelope as env
from gateway.router.fleet import FleetThread
from gateway.router.peers import Peer, PeerLinks

__all__ = ["Cluster"]

log = logging.getLogger("gateway.router")

SendLocal = Callable[[list[bytes]], "bool | None"]


# Incarnations of nodes declared lost and not heard since, kept (the oldest forgotten first).
MAX_DECLARED_LOST = 1024


class Cluster:
    def __init__(self, settings: ClusterSettings, listener: socket.socket | None = None, hwm: int = 100_000) -> None:
        self.settings = settings
        self.own_id = settings.node_id.encode()
        self.started = time.time()  # this incarnation: a restarted router is a restarted node to the others
        own = NodeRecord(settings.node_id, settings.peer, settings.tunnel, started=self.started,
                         curve_key=settings.public_key)
        self.fleet = FleetThread(settings, own)
        self.peers = PeerLinks(own, bind=settings.bind, listener_fd=listener.detach() if listener else None, hwm=hwm,
                               secret_key=settings.secret_key, public_keys=settings.public_keys)
        self._declared_lost: dict[tuple[str, float], None] = {}  # (node, started) lost, not told since back
        self.rows: dict[str, dict[str, Any]] = {}  # "B/wI" -> the row workers route by
        self.groups: dict[str, int] = {}  # this node's streams by group, as last published
        self.state = "serving"  # "draining" from the supervisor's stop on (SIGUSR1 to the router)
        self._published: tuple[dict, dict] | None = None
        self._send_local: SendLocal = lambda _msg: False
        self._workers: Callable[[], Iterable[bytes]] = lambda: ()
        self._refused: Callable[[bytes], None] = lambda _dest: None
        self._dropped_logged = 0.0
        self._rollouts_sent: bytes | None = None

    def bind(self, ctx: zmq.Context, poller: zmq.Poller, send_local: SendLocal,
             workers: Callable[[], Iterable[bytes]], refused: Callable[[bytes], None]) -> None:
        """Listen for peers, start the registry thread; `send_local` queues a message for a
        local worker (True, None when full, False when unreachable), `workers` names them,
        `refused(dest)` counts a batch a full queue refused."""
        self._send_local, self._workers, self._refused = send_local, workers, refused
        poller.register(self.peers.bind(ctx), zmq.POLLIN)
        if self.peers.zap is not None:
            poller.register(self.peers.zap, zmq.POLLIN)
        poller.register(self.fleet.wake_fd, zmq.POLLIN)
        if not self.peers.curve:
            log.warning("peer links between nodes are plaintext: run the fleet on a private network, or set "
                        "cluster_secret_key and cluster_public_keys", extra={"node_id": self.settings.node_id})
        self.fleet.start()
        self._sync()

    def drain(self) -> None:
        """This node is stopping: the others stop choosing its streams where a group has
        one elsewhere (Routing.candidates), before its workers stop accepting."""
        if self.state != "draining":
            self.state = "draining"
            self.fleet.set_state("draining")

    def close(self) -> None:
        self.fleet.stop()
        self.peers.close()

    # -- the broker's loop -------------------------------------------------------------

    def poll(self, events: dict[Any, int]) -> bool:
        """Handle what `events` says is ready; True when the workers' table changed."""
        changed = False
        if self.peers.zap is not None and self.peers.zap in events:
            self.peers.authenticate()
        if self.fleet.wake_fd in events:
            self.fleet.drain_wakeups()
            changed = self._sync()
        if self.peers.router in events:
            for peer, dest, src, kind, payload in self.peers.receive():
                self._deliver(peer, dest, src, kind, payload)
            if self.peers.revived:
                self.peers.revived = False
                changed = True
                self._tell_the_revived()
                self._rebuild()
        return changed

    def take_rollouts(self) -> bytes | None:
        """The fleet's rollout book when it changed since last taken (for the workers), else None."""
        raw = self.fleet.rollouts
        if raw is None or raw is self._rollouts_sent:
            return None
        self._rollouts_sent = raw
        return raw

    def tick(self, snapshot: dict[str, dict[str, Any]]) -> None:
        """Heartbeats out, silent nodes lost, this node's streams to the registry (the
        broker broadcasts the table after every tick)."""
        now = time.monotonic()
        self.peers.heartbeat(now)
        gone = self.peers.expire(now)
        for peer in gone:
            self._lose(peer, "silent", was_live=True)  # expire() has marked it not live already
        if gone:
            self._rebuild()
        self._publish(snapshot)

    def _sync(self) -> bool:
        for peer, reason in self.peers.sync(self.fleet.nodes):
            self._lose(peer, reason)
        self._rebuild()
        return True

    # -- frames between nodes ------------------------------------------------------------

    def forward(self, src: bytes, kind: bytes, dest: bytes, payload: bytes) -> bool | None:
        """A local worker's message for "B/wI": True when queued for B, None when the
        queue is full, False when B is not a live node. An answer to a worker of B that
        sent us frames goes also while B is not live yet: B may hear our heartbeats (and
        send requests) before we hear its own."""
        node, local = env.split_remote(dest)  # type: ignore[misc]  # the caller checked it is remote
        peer = self.peers.peers.get(node.decode(errors="replace"))
        if peer is None or not (peer.live or dest in peer.identities) or env.worker_index(local) is None:
            return False
        sent = self.peers.send(peer, env.to_peer(local, env.remote_identity(self.own_id, src), kind, payload))
        if sent:
            peer.identities.add(dest)
        return sent

    def _deliver(self, peer: Peer, dest: bytes, src: bytes, kind: bytes, payload: bytes) -> None:
        """A peer's message for a local worker. A node may speak only for its own workers."""
        node = peer.node_id.encode()
        origin = env.split_remote(src)
        if origin is None or origin[0] != node or env.worker_index(origin[1]) is None or (
                dest and env.worker_index(dest) is None):
            self._drop(peer, "names a worker that is not the sender's or not ours")
            return
        if kind == env.LOST:  # one of its workers is gone: for one of ours, or all of them
            peer.identities.discard(src)
            for worker in ([dest] if dest else list(self._workers())):
                self._send_local(env.to_worker(worker, env.ROUTER_ID, env.LOST, src))
            return
        if kind not in (env.FRAMES, env.COMMAND, env.FULL) or not dest:
            self._drop(peer, "unknown kind")
            return
        peer.identities.add(src)
        sent = self._send_local(env.to_worker(dest, src, kind, payload))
        if sent or kind == env.FULL:
            return
        if sent is None:
            self._refused(dest)
            if kind == env.FRAMES:  # our worker's queue is full: the batch's requests get 503 at their origin
                self.peers.send(peer, env.to_peer(origin[1], env.remote_identity(self.own_id, dest), env.FULL,
                                                  payload))
        elif sent is False:  # no such worker here (any more)
            self.peers.send(peer, env.to_peer(origin[1], env.remote_identity(self.own_id, dest), env.LOST, b""))

    def worker_lost(self, worker: bytes) -> None:
        """A local worker died or restarted: the other nodes fail what they have with it."""
        lost = env.to_peer(b"", env.remote_identity(self.own_id, worker), env.LOST, b"")
        for peer in self.peers.peers.values():
            if peer.live:
                self.peers.send(peer, lost)

    def _lose(self, peer: Peer, reason: str, was_live: bool = False) -> None:
        if not (was_live or peer.live or peer.identities):
            return  # never reached (or lost already): no worker of ours has anything with it
        log.warning("peer node lost", extra={"peer_node": peer.node_id, "reason": reason,
                                             "channels": len(peer.identities)})
        workers = list(self._workers())
        # Its workers in the rows too: a worker may hold a channel this router never carried
        # a batch for (one opened just before a respawn of this router).
        node = peer.node_id.encode()
        identities = peer.identities | {env.remote_identity(node, w.encode()) for w in peer.record.workers}
        for identity in sorted(identities):
            for worker in workers:
                self._send_local(env.to_worker(worker, env.ROUTER_ID, env.LOST, identity))
        peer.identities.clear()
        peer.live = False
        # By incarnation, not by Peer: a node whose lease ran out meanwhile comes back as a new
        # Peer (the registry dropped and re-added it), and must be told all the same.
        self._declared_lost[(peer.node_id, peer.record.started)] = None
        while len(self._declared_lost) > MAX_DECLARED_LOST:
            del self._declared_lost[next(iter(self._declared_lost))]

    def _tell_the_revived(self) -> None:
        """A node we declared lost is heard again (a partition healed before it lost
        us): we failed what we had with it, and it must fail what it has with us, or
        it would serve requests whose callers got a 502 long ago, and wait for answers
        to requests we dropped. Our workers are LOST to it, as after a restart."""
        for peer in self.peers.peers.values():
            if peer.live and (peer.node_id, peer.record.started) in self._declared_lost:
                del self._declared_lost[(peer.node_id, peer.record.started)]
                log.info("peer node back after it was lost: it fails what it had with this node",
                         extra={"peer_node": peer.node_id})
                for worker in self._workers():
                    self.peers.send(peer, env.to_peer(b"", env.remote_identity(self.own_id, worker), env.LOST, b""))

    def _drop(self, peer: Peer, why: str) -> None:
        if time.monotonic() - self._dropped_logged >= 1.0:
            self._dropped_logged = time.monotonic()
            log.warning("dropped a message from a peer node: %s", why, extra={"peer_node": peer.node_id})

    # -- what workers and the registry are told ------------------------------------------------

    def _rebuild(self) -> None:
        """The rows of the live nodes' workers, as Routing.candidates reads them."""
        rows: dict[str, dict[str, Any]] = {}
        for peer in self.peers.peers.values():
            if not peer.live:
                continue
            rec = peer.record
            for wid, load in rec.workers.items():
                rows[f"{rec.node_id}/{wid}"] = {
                    "node": rec.node_id, "worker": int(wid[1:]), "node_state": rec.state,
                    "capabilities": list(load.capabilities),
                    "clients": [{"client_id": c.client_id, "group": c.group, "connection": c.connection,
                                 "inflight": c.inflight, "draining": c.draining, "unhealthy": list(c.unhealthy),
                                 "connected_at": c.connected_at, "certificate": list(c.certificate),
                                 "instance": c.instance, "config_version": c.config[0] if c.config else "",
                                 "config_refused": list(c.config[1:3]) if len(c.config) == 3 else []}
                                for c in load.clients],
                }
        self.rows = rows

    def _publish(self, snapshot: dict[str, dict[str, Any]]) -> None:
        groups: dict[str, int] = {}
        workers: dict[str, WorkerLoad] = {}
        for wid, info in snapshot.items():
            for group, n in info.get("streams", {}).items():
                groups[group] = groups.get(group, 0) + n
            clients = tuple(ClientLoad(c["client_id"], c["group"], c["connection"], c["pending"] + c["serving"],
                                       bool(c["draining"]), tuple(c.get("unhealthy", ())), c.get("connected_at", 0.0),
                                       tuple(c.get("certificate", ())), c.get("instance", ""),
                                       (c.get("config_version", ""), *c.get("config_refused", ())))
                            for c in info.get("clients", ()))
            workers[wid] = WorkerLoad(clients, tuple(info.get("capabilities", ())))
        if (groups, workers) != self._published:
            self._published = (groups, workers)
            self.groups = groups
            self.fleet.publish(groups, workers)

    def view(self) -> bytes:
        """The FLEET payload: every node this one knows, itself first."""
        s = self.settings
        nodes = [{"node_id": s.node_id, "address": s.tunnel, "peer": s.peer, "state": self.state,
                  "groups": self.groups, "last_seen": time.time(), "started": self.started}]
        for node_id in sorted(self.peers.peers):
            peer = self.peers.peers[node_id]
            rec = peer.record
            nodes.append({"node_id": node_id, "address": rec.tunnel, "peer": rec.peer,
                          "state": rec.state if peer.live else "unreachable", "groups": rec.groups,
                          "last_seen": peer.heard_at, "started": rec.started})
        return orjson.dumps({"node_id": s.node_id, "registry_up": self.fleet.up, "nodes": nodes})
