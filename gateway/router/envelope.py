"""The one module that builds and splits ZeroMQ envelopes between workers
and the router, and between the routers of a fleet's nodes.

worker -> router (DEALER sends):   [kind, dest, payload]
router -> worker (ROUTER sends):   [dest identity, src, kind, payload]
worker receives:                   [src, kind, payload]
router -> router (DEALER sends):   [dest, src, kind, payload]
router receives from a peer:       [node id, dest, src, kind, payload]

A worker of another node is addressed as "NODE/wI" (`remote_identity`); over a
peer link `dest` is the receiving node's own worker ("wI", or empty for all of
them) and `src` the sending node's ("NODE/wI", or the node id for a HEARTBEAT).

Kinds:
  FRAMES    payload is a batch of encoded tunnel frames for `dest`
  ANNOUNCE  payload is JSON: the worker's shard info (also its heartbeat)
  TABLE     payload is JSON: the whole shard table (also the router's heartbeat)
  LOST      a worker is gone (dead, or unroutable); payload is its identity
  FULL      a FRAMES batch the router could not queue for a worker whose
            high-water mark is full (an overload, not a loss): sent back to
            the batch's sender with `src` the full worker and the batch as payload
  COMMAND   payload is JSON: an admin command for `dest` (e.g. drain); one with
            "ask" is answered to its sender by a COMMAND {"op": "result", "ask",
            "count"} (RouterLink.ask; across nodes too, the peer links carry both)
  FLEET     payload is JSON: the fleet as this node sees it (with cluster set;
            sent with TABLE, whose rows then include other nodes' workers)
  HEARTBEAT router to router: payload is JSON {"started"}: the node is alive
  ROLLOUTS  worker -> router: the rollout book the deciding worker 0 wrote, for
            the fleet's registry; router -> worker: the fleet's book as the
            registry has it (b"" none yet), sent on a change and to a new worker
"""
from __future__ import annotations

import os
import tempfile

__all__ = [
    "FRAMES", "ANNOUNCE", "TABLE", "LOST", "FULL", "COMMAND", "FLEET", "HEARTBEAT", "ROLLOUTS", "ROUTER_ID",
    "worker_identity", "worker_index", "ipc_endpoint", "remote_identity", "split_remote",
    "to_router", "from_worker", "to_worker", "from_router", "to_peer", "from_peer",
    "HEARTBEAT_INTERVAL", "HEARTBEAT_LIVENESS",
]

FRAMES = b"F"
ANNOUNCE = b"A"
TABLE = b"T"
LOST = b"L"
FULL = b"O"
COMMAND = b"C"
FLEET = b"N"
HEARTBEAT = b"H"
ROLLOUTS = b"R"
ROUTER_ID = b"router"

# Workers announce (and the router broadcasts its table) this often; a peer
# silent for LIVENESS intervals is taken as gone.
HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_LIVENESS = 3


def worker_identity(index: int) -> bytes:
    return f"w{index}".encode()


def worker_index(identity: bytes) -> int | None:
    if identity.startswith(b"w") and identity[1:].isdigit():
        return int(identity[1:])
    return None


def remote_identity(node: bytes, local: bytes) -> bytes:
    """How this node's workers and router name worker `local` of node `node`."""
    return node + b"/" + local


def split_remote(identity: bytes) -> tuple[bytes, bytes] | None:
    """(node, local worker) of a remote identity; None for one of this node."""
    node, sep, local = identity.partition(b"/")
    return (node, local) if sep else None


def ipc_endpoint(instance: str, directory: str | None = None) -> str:
    """A router address unique to this gateway instance."""
    base = directory or tempfile.gettempdir()
    return f"ipc://{os.path.join(base, f'tunnel-gateway-{instance}.router')}"


def to_router(kind: bytes, dest: bytes, payload: bytes) -> list[bytes]:
    return [kind, dest, payload]


def from_worker(msg: list[bytes]) -> tuple[bytes, bytes, bytes, bytes]:
    """(src, kind, dest, payload) of what a ROUTER received from a worker."""
    if len(msg) != 4:
        raise ValueError(f"bad envelope with {len(msg)} parts")
    return msg[0], msg[1], msg[2], msg[3]


def to_worker(dest: bytes, src: bytes, kind: bytes, payload: bytes) -> list[bytes]:
    return [dest, src, kind, payload]


def from_router(msg: list[bytes]) -> tuple[bytes, bytes, bytes]:
    """(src, kind, payload) of what a worker's DEALER received."""
    if len(msg) != 3:
        raise ValueError(f"bad envelope with {len(msg)} parts")
    return msg[0], msg[1], msg[2]


def to_peer(dest: bytes, src: bytes, kind: bytes, payload: bytes) -> list[bytes]:
    return [dest, src, kind, payload]


def from_peer(msg: list[bytes]) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """(node, dest, src, kind, payload) of what a router's peer ROUTER received."""
    if len(msg) != 5:
        raise ValueError(f"bad peer envelope with {len(msg)} parts")
    return msg[0], msg[1], msg[2], msg[3], msg[4]
