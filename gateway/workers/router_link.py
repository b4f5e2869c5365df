"""A worker's link to the router: cross-worker channels and the shard table.

Each peer worker is reached through a *channel*: a TunnelStream whose
transport is the ZeroMQ link, so requests crossing workers get the same
exchanges, flow control and RESETs as on a client tunnel. Liveness comes from
the router (LOST, and its table broadcast as a heartbeat), not from PINGs.

In a fleet a worker of another node is a peer like any other, named "NODE/wI":
the router forwards to and from it. Its rows come with the table (kept apart in
`remote`), and the router's view of the fleet in FLEET (`fleet`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

import orjson
import zmq
import zmq.asyncio

from gateway.history import process_history
from gateway.router import envelope as env
from gateway.tunnel import frames
from gateway.tunnel.stream import TunnelStream
from gateway.workers.inspector import answer_op

if TYPE_CHECKING:
    from gateway.workers.routing import Routing

__all__ = ["RouterLink"]

log = logging.getLogger("gateway.worker.link")

# How long `ask` waits for a worker's answer to an admin command (a worker of
# another node included): a worker that is gone, or of a version that does not
# answer, must not hold the admin request.
ASK_TIMEOUT = 3.0


class LinkTransport:
    """A channel's transport: writes go through the router; reads are fed by
    the link's receive loop, so `read` only waits for the end. A batch the link
    cannot queue (the high-water mark is full) fails its requests with
    `overloaded`; the channel stays open."""

    __slots__ = ("link", "dest", "remote", "_closed")

    def __init__(self, link: "RouterLink", dest: bytes) -> None:
        self.link = link
        self.dest = dest
        self.remote = env.split_remote(dest) is not None  # a worker of another node
        self._closed = asyncio.Event()

    async def read(self) -> bytes | None:
        await self._closed.wait()
        return None

    async def write(self, raw: bytes) -> None:
        self.link.frames_out += 1
        if self.remote:
            self.link.node_out += 1
        try:
            await self.link.sock.send_multipart(env.to_router(env.FRAMES, self.dest, raw), zmq.NOBLOCK)
        except zmq.Again:
            self.link.undelivered(self.dest, raw)

    def peer(self) -> str:
        return self.dest.decode()

    async def close(self) -> None:
        self._closed.set()


class RouterLink:
    """Requests from other workers go to `routing`; `report` is what this
    worker announces to the router (its part of the shard table); admin
    commands the router relays go to `on_command`."""

    def __init__(self, routing: "Routing", endpoint: str, *, report: Callable[[], dict[str, Any]],
                 on_command: Callable[[Mapping[str, Any]], int]) -> None:
        self.routing = routing
        self.endpoint = endpoint
        self.report = report
        self.on_command = on_command
        # The commands answered with data, by op: the status page's graphs, the Inspector's last
        # requests (or one to replay), and those the worker adds (gateway/workers/rollouts.py).
        self.answers: dict[str, Callable[[Mapping[str, Any]], Any]] = {"history": _history, "requests": answer_op}
        self.on_rollouts: Callable[[bytes], None] = lambda _raw: None  # the fleet's rollout book came
        self.identity = env.worker_identity(routing.index)
        self.channels: dict[bytes, TunnelStream] = {}
        self.table: dict[str, dict[str, Any]] = {}  # this node's workers' rows, by "wI"
        self.remote: dict[str, dict[str, Any]] = {}  # other nodes' workers' rows, by "NODE/wI"
        self.fleet: dict[str, Any] | None = None  # the router's last FLEET (with cluster set)
        self.frames_in = 0  # batches through the router (other nodes' included)
        self.frames_out = 0
        self.node_in = 0  # of those, batches from and to other nodes
        self.node_out = 0
        self.overloaded = 0  # batches refused at a full high-water mark (here or at the router)
        self._full_logged = 0.0  # logged at most once a second
        self.router_ok = False
        self._last_table = 0.0
        self._announce_now = asyncio.Event()
        self._new_table = asyncio.Event()  # set at each TABLE, for `until_table`
        self._sees: frozenset[str] = frozenset()  # the groups this worker can reach, as last announced
        self._tasks: list[asyncio.Task] = []
        self._asked: dict[str, tuple[bytes, asyncio.Future[dict | None]]] = {}  # ask id -> (worker, its answer)
        self._asked_seq = 0
        self._ctx: zmq.asyncio.Context | None = None
        self.sock: zmq.asyncio.Socket | None = None

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        sock.connect(self.endpoint)
        self.sock = sock
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._receive()), loop.create_task(self._heartbeat())]

    async def stop(self) -> None:
        for ch in list(self.channels.values()):
            ch.close("worker_stopping")
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.sock is not None:
            self.sock.close(0)
        if self._ctx is not None:
            self._ctx.term()

    # -- channels ------------------------------------------------------------

    def channel(self, peer: bytes) -> TunnelStream:
        ch = self.channels.get(peer)
        if ch is not None and not ch.closed:
            return ch
        ch = TunnelStream(LinkTransport(self, peer), limits=self.routing.stream_limits(channel=True),
                          on_request=self.routing.serve_remote,
                          peer_id=peer.decode(), label=f"worker {peer.decode()}")
        # A worker restarted on newer code (an upgrade in place) may meet older ones.
        row = (self.remote if b"/" in peer else self.table).get(peer.decode(), {})
        ch.header_fields = frames.HEADER_FIELDS in row.get("capabilities", ())
        self.channels[peer] = ch
        task = asyncio.get_running_loop().create_task(ch.run())
        task.add_done_callback(lambda _t, p=peer, c=ch: self._channel_done(p, c))
        return ch

    def _channel_done(self, peer: bytes, ch: TunnelStream) -> None:
        if self.channels.get(peer) is ch:
            del self.channels[peer]

    def undelivered(self, peer: bytes, raw: bytes) -> None:
        """A batch for `peer` that no queue would take (a full high-water mark
        here or at the router): each request with a frame in it fails with
        `overloaded` (503 to its caller), the peer told by a RESET; the channel
        and its other requests go on. (LOST is for a peer that is gone.)"""
        self.overloaded += 1
        ch = self.channels.get(peer)
        try:
            batch = frames.decode_frames(raw) if ch is not None else ()
        except frames.ProtocolError:
            return
        message = f"the queue to worker {peer.decode()} is full"
        for rid, reply in {(f.request_id, f.reply) for f in batch if f.request_id}:
            if reply:
                inbound = ch.serving.get(rid)
                if inbound is not None:
                    inbound.reset("overloaded", message)
            elif (out := ch.pending.get(rid)) is not None:
                out.close("overloaded", message)
        if time.monotonic() - self._full_logged >= 1.0:
            self._full_logged = time.monotonic()
            log.warning("batches to %s refused: queue full", peer.decode(),
                        extra={"peer": peer.decode(), "refused_total": self.overloaded})

    def lose(self, peer: bytes, reason: str) -> None:
        for asked, answer in list(self._asked.values()):
            if asked == peer and not answer.done():
                answer.set_result(None)  # it will not answer: say so now, not at the timeout
        # A worker of this node leaves routing at once. Another node's rows are the router's
        # to drop (it does when it loses the node): a LOST from a node that is there (it
        # fails what it had with us after a partition) leaves its workers routable.
        self.table.pop(peer.decode(), None)
        ch = self.channels.pop(peer, None)
        if ch is not None:
            ch.close(reason)

    # -- loops -----------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            msg = await self.sock.recv_multipart(copy=True)
            try:
                src, kind, payload = env.from_router(msg)
            except ValueError as exc:
                log.warning("bad envelope from router: %s", exc)
                continue
            if kind == env.FRAMES:
                self.frames_in += 1
                if b"/" in src:
                    self.node_in += 1
                ch = self.channel(src)
                try:
                    ch.feed(payload)
                except frames.ProtocolError as exc:
                    log.warning("bad frames from %s: %s", src.decode(), exc)
                    ch.close("protocol_error")
            elif kind == env.TABLE:
                rows = orjson.loads(payload)
                self.table = {k: v for k, v in rows.items() if "/" not in k}
                self.remote = {k: v for k, v in rows.items() if "/" in k} if len(rows) > len(self.table) else {}
                self._last_table = time.monotonic()
                self._new_table.set()
                self._new_table = asyncio.Event()
                sees = frozenset(self.routing.visible_streams())
                if sees != self._sees:  # a group came or went: said at once (a quick tunnel's WELCOME waits for it)
                    self._sees = sees
                    self.announce_soon()
                if not self.router_ok:
                    log.info("router connected")
                self.router_ok = True
            elif kind == env.LOST:
                row = self.table.get(payload.decode()) or {}
                # A worker that said it is shutting down (a SIGTERM'd gateway) stops; any other is lost.
                log.log(logging.INFO if row.get("stopping") else logging.WARNING,
                        "worker stopped" if row.get("stopping") else "worker lost", extra={"peer": payload.decode()})
                self.lose(payload, "worker_lost")
            elif kind == env.FULL:
                self.undelivered(src, payload)
            elif kind == env.FLEET:
                self.fleet = orjson.loads(payload)
            elif kind == env.COMMAND:
                await self._command(src, payload)
            elif kind == env.ROLLOUTS:
                self.on_rollouts(payload)

    def announce_soon(self) -> None:
        self._announce_now.set()

    async def until_table(self, check: Callable[[dict[str, dict[str, Any]]], bool], timeout: float) -> bool:
        """Wait until the shard table the router last sent (to every worker at once) passes
        `check`; False when no such table came within `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not check(self.table):
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._new_table.wait(), left)
            except asyncio.TimeoutError:
                return False
        return True

    async def _announce(self) -> None:
        try:
            info = orjson.dumps(self.report())
            await self.sock.send_multipart(env.to_router(env.ANNOUNCE, b"", info), zmq.NOBLOCK)
        except zmq.Again:
            pass

    async def _heartbeat(self) -> None:
        interval = env.HEARTBEAT_INTERVAL
        while True:
            self._announce_now.clear()
            await self._announce()
            if self.router_ok and time.monotonic() - self._last_table > interval * env.HEARTBEAT_LIVENESS * 2:
                # Requests that crossed the router fail now; the rest go on.
                log.warning("router lost; cross-worker requests fail until it is back")
                self.router_ok = False
                self.table, self.remote = {}, {}
                for peer in list(self.channels):
                    self.lose(peer, "router_lost")
            try:
                await asyncio.wait_for(self._announce_now.wait(), interval)
            except asyncio.TimeoutError:
                pass

    async def send_rollouts(self, raw: bytes, revision: int) -> None:
        """The book this worker decided, for the fleet's registry (the router writes it)."""
        try:
            await self.sock.send_multipart(env.to_router(env.ROLLOUTS, str(revision).encode(), raw), zmq.NOBLOCK)
        except zmq.Again:
            pass  # sent again at the next change or RESEND

    async def send_command(self, worker: str, command: Mapping[str, Any]) -> None:
        await self.sock.send_multipart(env.to_router(env.COMMAND, worker.encode(), orjson.dumps(command)))

    # -- admin commands with an answer ----------------------------------------

    async def ask(self, worker: str, command: Mapping[str, Any], timeout: float = ASK_TIMEOUT) -> int | None:
        """Send an admin command to `worker` ("wI", or "NODE/wI" on another node) and
        wait for how many streams it touched; None when it did not answer in time (gone,
        unreachable, or a worker of a version that does not answer)."""
        answer = await self._ask(worker, command, timeout)
        count = answer.get("count") if answer is not None else None
        return count if isinstance(count, int) else None

    async def query(self, worker: str, command: Mapping[str, Any], timeout: float = ASK_TIMEOUT) -> dict | None:
        """Like `ask`, for a command answered with data (op "history": the worker's
        snapshot, gateway/history.py); None when it did not answer with any in time."""
        answer = await self._ask(worker, command, timeout)
        data = answer.get("data") if answer is not None else None
        return data if isinstance(data, dict) else None

    async def _ask(self, worker: str, command: Mapping[str, Any], timeout: float) -> dict | None:
        self._asked_seq += 1
        ask_id = f"{self.identity.decode()}:{self._asked_seq}"
        answer: asyncio.Future[dict | None] = asyncio.get_running_loop().create_future()
        self._asked[ask_id] = (worker.encode(), answer)
        message = env.to_router(env.COMMAND, worker.encode(), orjson.dumps({**command, "ask": ask_id}))
        try:
            # Never block on the send: a router that is gone would hold the admin request.
            await self.sock.send_multipart(message, zmq.NOBLOCK)
            return await asyncio.wait_for(answer, timeout)
        except (zmq.Again, asyncio.TimeoutError):
            return None
        finally:
            self._asked.pop(ask_id, None)

    async def _command(self, src: bytes, payload: bytes) -> None:
        """A command the router relayed: an answer to one of ours (op "result"), or one to
        run, answered when its sender asked (the same envelope kind both ways, so a peer
        link carries it as it is)."""
        try:
            command = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.warning("bad admin command from %s", src.decode(errors="replace"))
            return
        if not isinstance(command, dict):
            return
        if command.get("op") == "result":
            asked = self._asked.get(str(command.get("ask")))
            # Only the worker asked may answer: another could not end someone else's wait.
            if asked is not None and asked[0] == src and not asked[1].done():
                asked[1].set_result(command)
            return
        try:
            answer_with = self.answers.get(command.get("op"))  # type: ignore[arg-type]
            if answer_with is not None:
                result: dict[str, Any] = {"data": answer_with(command)}
            else:
                result = {"count": self.on_command(command)}
        except Exception:
            log.exception("admin command failed")
            return
        if "ask" in command:
            answer = {"op": "result", "ask": command["ask"], **result}
            try:
                await self.sock.send_multipart(env.to_router(env.COMMAND, src, orjson.dumps(answer)), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the asker's wait ends at its timeout


def _history(command: Mapping[str, Any]) -> dict[str, Any]:
    """Op "history", the status page's graphs: this worker's last 15 minutes (of one group, or all)."""
    group = command.get("group")
    return process_history().snapshot(group if isinstance(group, str) else None)
