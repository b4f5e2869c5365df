"""One node's view of the fleet, kept in Redis: each node holds a lease on its
own record and watches everyone's.

What Redis holds (everything under the prefix, so several fleets share one Redis):

* `{prefix}:node:{node_id}`: the node's record as JSON (node_id, peer and
  tunnel addresses, state, started, groups {name: streams}, each worker's
  client streams, seen), written
  with SET PX node_ttl and renewed every node_ttl/3. A node that dies stops
  renewing and its key expires: that is how the others learn it is gone.
* `{prefix}:fleet`: a pub/sub channel on which a node publishes its id on
  every change of its record (join, state, groups, leave). A message is only
  a hint to re-read that key; a missed one is mended by the full resync
  (SCAN + MGET) every node_ttl/2, which is also what drops an expired node:
  gone from every copy within 1.5 x node_ttl of its last renewal.

Only stock commands (SET, MGET, DEL, SCAN, PUBLISH, SUBSCRIBE; SET's GET
option needs Redis 6.2): keyspace notifications would need CONFIG SET, which
managed Redis services refuse.

The request path reads `nodes()`, a local copy, and never waits on Redis.
Redis down: the copy stays as it was (a node is not dropped because Redis
cannot be asked about it), `up` is False, one warning is logged for the whole
outage, and both tasks retry with capped back-off; when Redis answers again
the node re-registers and resyncs, and says so at info.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Awaitable, Callable, Mapping

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from gateway.backoff import Backoff
from gateway.cluster.record import STATES, NodeRecord, WorkerLoad, glob_escape, merge, routing_changed
from gateway.exposure import mask_text, mask_url

__all__ = ["NodeRecord", "Registry", "STATES"]  # the record re-exported: one import for users

log = logging.getLogger("gateway.cluster")

# The lease is renewed three times a ttl, so one slow or lost write does not let it expire.
RENEW_FRACTION = 1 / 3
# A full resync every half ttl: an expired node is gone from the copy within 1.5 x ttl.
RESYNC_FRACTION = 1 / 2
# Back-off while Redis does not answer: from this, doubling, capped at half a ttl
# (a returning Redis is noticed about as soon as a resync would notice anything).
BACKOFF_INITIAL = 0.05

# What "Redis did not answer" looks like: redis-py's errors (connection, timeout, a
# refused command) and the OS's (refused, reset, TLS, and asyncio's TimeoutError,
# an OSError). Anything else is a bug.
_FAILURES = (RedisError, OSError)


class Registry:
    """This node's lease in Redis and its copy of the fleet (itself included).

    `start()` returns at once, also while Redis is down: the node serves its own
    streams and joins when Redis answers. `nodes()` and `up` are read without an
    await; `on_change(nodes)` is called (in the loop) on every change of the copy.
    """

    def __init__(self, url: str, own: NodeRecord, *, prefix: str = "tunnel", node_ttl: float = 5.0,
                 on_change: Callable[[dict[str, NodeRecord]], None] | None = None) -> None:
        if own.state not in STATES:
            raise ValueError(f"state must be one of {STATES}, not {own.state!r}")
        if node_ttl <= 0:
            raise ValueError("node_ttl must be positive")
        self.prefix = prefix
        self.node_ttl = node_ttl
        self.on_change = on_change
        self.where = mask_url(url)  # what logs may say of the URL: never its password
        # Every wait on Redis is bounded: a write, a read, a connect, the leave.
        self._op_timeout = min(2.0, max(0.2, node_ttl * RENEW_FRACTION))
        # redis-py's own retries are off: the two loops below retry with back-off,
        # and a command that fails must say so at once to mark the registry down.
        self._redis: Redis = Redis.from_url(url, socket_timeout=self._op_timeout,
                                            socket_connect_timeout=self._op_timeout,
                                            retry=Retry(NoBackoff(), 0))
        self._own = dataclasses.replace(own, seen=own.seen or time.time())
        self._key = self._key_of(own.node_id)
        self._channel = f"{prefix}:fleet"
        self._nodes: dict[str, NodeRecord] = {own.node_id: self._own}
        self._tasks: list[asyncio.Task] = []
        self._dirty = asyncio.Event()  # the own record changed: write it now
        self._version = 0  # bumped by every change of the own record
        self._published = -1  # the version last announced on the channel
        self._lease_ok = self._watch_ok = False  # up is both
        self._reported: bool | None = None  # the state last logged: one line per outage, not per retry
        self._resumed = False  # the watch lost Redis and is coming back
        self._keep_until = 0.0  # until then (loop time) a resync adds and updates but drops no node
        self._clash_logged = self._stopped = False

    # -- what the rest of the node reads and sets (no await) -------------------------

    @property
    def up(self) -> bool:
        """True while the lease is held and the copy follows Redis (tunnel_cluster_registry_up)."""
        return self._lease_ok and self._watch_ok

    @property
    def own(self) -> NodeRecord:
        return self._own

    def nodes(self) -> dict[str, NodeRecord]:
        """The fleet as last known, this node included: {node_id: record}."""
        return dict(self._nodes)

    def set_groups(self, groups: dict[str, int]) -> None:
        """The groups this node holds streams of, and how many: written at once (coalesced)."""
        self.set_load(groups, self._own.workers)

    def set_load(self, groups: dict[str, int], workers: dict[str, WorkerLoad]) -> None:
        """Streams by group and each worker's clients: written at once when what others
        route by changed; in-flight figures alone go with the next renewal."""
        rec = dataclasses.replace(self._own, groups={str(k): int(v) for k, v in groups.items()}, workers=workers)
        if routing_changed(self._own, rec):
            self._update(rec)
        elif rec != self._own:
            self._own, self._nodes = rec, {**self._nodes, rec.node_id: rec}

    def set_state(self, state: str) -> None:
        """"serving" or "draining": written at once."""
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, not {state!r}")
        if state != self._own.state:
            log.info("node state %s", state, extra={"node_id": self._own.node_id, "state": state})
            self._update(dataclasses.replace(self._own, state=state))

    def _update(self, rec: NodeRecord) -> None:
        self._own = rec
        self._version += 1
        self._nodes = {**self._nodes, rec.node_id: rec}
        # The lease task writes the newest record when it is free: one write in flight at most.
        self._dirty.set()
        self._notify()

    # -- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start holding the lease and watching the fleet; returns without waiting for Redis."""
        if self._tasks or self._stopped:
            return
        self._tasks = [asyncio.create_task(self._lease(), name=f"registry-lease-{self._own.node_id}"),
                       asyncio.create_task(self._watch(), name=f"registry-watch-{self._own.node_id}")]
        for task in self._tasks:
            task.add_done_callback(self._task_done)

    async def stop(self) -> None:
        """Leave the fleet: delete the own key, say so on the channel, close. Bounded
        by a timeout when Redis is down (the lease then expires within node_ttl)."""
        if self._stopped:
            return
        self._stopped = True
        tasks, self._tasks = self._tasks, []
        await cancel_all(tasks)
        self._lease_ok = self._watch_ok = False
        try:
            async with asyncio.timeout(self._op_timeout):
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.delete(self._key)
                    pipe.publish(self._channel, self._own.node_id)
                    await pipe.execute()
            log.info("left the fleet", extra={"node_id": self._own.node_id, "redis": self.where})
        except _FAILURES as exc:
            log.warning("could not leave the fleet in Redis; the lease expires within node_ttl",
                        extra={"node_id": self._own.node_id, "redis": self.where, "error": _describe(exc)})
        await _bounded(self._redis.aclose(), self._op_timeout)

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug, not an outage: say so loudly; the copy is no longer followed.
            self._watch_ok = False
            log.error("registry task failed", exc_info=task.exception(),
                      extra={"node_id": self._own.node_id, "task": task.get_name()})

    # -- the lease ----------------------------------------------------------------------

    async def _lease(self) -> None:
        backoff = self._backoff()
        while not self._stopped:
            self._dirty.clear()  # a change during the write sets it again: written next
            try:
                await self._write()
            except _FAILURES as exc:
                self._lease_ok = False
                self._lost(exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self._lease_ok = True
            self._check_up()
            try:
                async with asyncio.timeout(self.node_ttl * RENEW_FRACTION):
                    await self._dirty.wait()
            except TimeoutError:
                pass  # time to renew

    async def _write(self) -> None:
        version = self._version
        rec = dataclasses.replace(self._own, seen=time.time())
        # GET returns what the key held: None means the key was gone (first
        # registration, expired, or Redis lost its data): announce it again.
        old = await self._redis.set(self._key, rec.to_json(), px=max(1, int(self.node_ttl * 1000)), get=True)
        if old is not None and self._lease_ok:
            self._check_clash(old)
        if self._own.seen != rec.seen and self._version == version:
            # A renewal: not a change to notify (in-flight figures set meanwhile are kept).
            self._own = own = dataclasses.replace(self._own, seen=rec.seen)
            self._nodes = {**self._nodes, own.node_id: own}
        if old is None or version != self._published:
            await self._redis.publish(self._channel, rec.node_id)
            self._published = version

    def _check_clash(self, old: bytes) -> None:
        # Two live nodes with one node_id overwrite each other's record and the
        # fleet flaps between them; a key we held that now has another start time says so.
        try:
            started = NodeRecord.from_json(old).started
        except ValueError:
            started = None
        if started != self._own.started and not self._clash_logged:
            self._clash_logged = True
            log.error("another node writes this node_id; give each node its own node_id",
                      extra={"node_id": self._own.node_id, "redis": self.where})

    # -- the watch ----------------------------------------------------------------------

    async def _watch(self) -> None:
        backoff = self._backoff()
        while not self._stopped:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                # Subscribe before the resync: a change made between the two is
                # then both in the resync and in a message, never in neither.
                await pubsub.subscribe(self._channel)
                if self._resumed:
                    # Redis may have lost every key: until the others have had a ttl
                    # to re-register, a resync must not drop them from the copy.
                    self._keep_until = asyncio.get_running_loop().time() + self.node_ttl
                    self._dirty.set()  # and re-register now, not at the next renewal
                await self._resync()
                self._resumed = False
                self._watch_ok = True
                self._check_up()
                backoff.reset()
                await self._follow(pubsub)
            except _FAILURES as exc:
                self._watch_ok = False
                self._resumed = True
                self._lost(exc)
                await asyncio.sleep(backoff.next_delay())
            finally:
                await _bounded(pubsub.aclose(), self._op_timeout)

    async def _follow(self, pubsub: PubSub) -> None:
        """Messages as they come, a full resync every RESYNC_FRACTION of the ttl; both in
        this one task, so a resync's snapshot never overwrites a newer message's read."""
        loop = asyncio.get_running_loop()
        period = self.node_ttl * RESYNC_FRACTION
        next_sync = loop.time() + period
        while not self._stopped:
            wait = next_sync - loop.time()
            if wait <= 0:
                await self._resync()
                next_sync = loop.time() + period
                continue
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            changed: set[str] = set()
            while msg is not None:  # a burst of messages: one MGET for all of them
                if msg.get("type") == "message":
                    changed.add(_text(msg["data"]))
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
            changed.discard(self._own.node_id)  # this node's record is the one it holds
            if changed:
                ids = sorted(changed)
                values = await self._redis.mget([self._key_of(i) for i in ids])
                self._apply({i: self._parse(i, raw) for i, raw in zip(ids, values)}, full=False)

    async def _resync(self) -> None:
        keys = [key async for key in self._redis.scan_iter(match=glob_escape(self._key_of("")) + "*", count=200)]
        keys = sorted(set(keys))  # SCAN may return a key twice
        values = await self._redis.mget(keys) if keys else []
        head = len(self._key_of(""))
        found = {rec.node_id: rec for key, raw in zip(keys, values)
                 if (rec := self._parse(_text(key)[head:], raw)) is not None}
        self._apply(found, full=True)

    def _parse(self, node_id: str, raw: bytes | None) -> NodeRecord | None:
        if raw is None:
            return None
        try:
            rec = NodeRecord.from_json(raw)
        except ValueError as exc:
            log.debug("unreadable node record", extra={"key": self._key_of(node_id), "error": str(exc)})
            return None
        # A key of another fleet whose prefix extends ours ("tunnel" and
        # "tunnel:node:x") names a node_id its record does not hold: not ours.
        return rec if rec.node_id == node_id else None

    def _apply(self, updates: Mapping[str, NodeRecord | None], full: bool) -> None:
        # A full resync drops the nodes it did not find, except in the grace after a return.
        drop = full and asyncio.get_running_loop().time() >= self._keep_until
        own = self._own.node_id
        nodes, joined, left, changed = merge(self._nodes, own, updates, drop_absent=drop)
        self._nodes = nodes
        for node_id in joined:
            rec = nodes[node_id]
            log.info("node joined", extra={"node_id": own, "peer_node": node_id, "peer": rec.peer,
                                           "state": rec.state})
        for node_id in left:
            log.info("node left", extra={"node_id": own, "peer_node": node_id})
        if changed:
            self._notify()

    def _notify(self) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(dict(self._nodes))
        except Exception:  # a subscriber's bug must not stop the registry following Redis
            log.exception("registry on_change failed", extra={"node_id": self._own.node_id})

    # -- Redis up and down --------------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        if self._reported is False:
            return
        self._reported = False
        extra = {"node_id": self._own.node_id, "redis": self.where, "error": _describe(exc)}
        if _is_auth_error(exc):
            log.error("Redis refused the cluster URL's credentials; serving from the last copy of the fleet "
                      "and retrying", extra=extra)
        else:
            log.warning("Redis unreachable; serving from the last copy of the fleet and retrying", extra=extra)

    def _check_up(self) -> None:
        if not self.up or self._reported is True:
            return
        came_back = self._reported is False
        self._reported = True
        log.info("Redis reachable again; re-registered and resynced" if came_back else "joined the fleet",
                 extra={"node_id": self._own.node_id, "redis": self.where, "nodes": len(self._nodes)})

    def _backoff(self) -> Backoff:
        return Backoff(BACKOFF_INITIAL, self.node_ttl * RESYNC_FRACTION)

    def _key_of(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"


async def cancel_all(tasks: list[asyncio.Task], timeout: float = 2.0) -> None:
    """Cancel the tasks and wait until they are done, cancelling again while they are not."""
    # Once is not always enough: a cancel that lands as redis-py's pub/sub read times
    # out turns into that timeout, which get_message answers as "no message", and the
    # task reads on. The loops also stop on `_stopped`; a second cancel ends the read.
    pending = {t for t in tasks if not t.done()}
    deadline = asyncio.get_running_loop().time() + timeout
    while pending and asyncio.get_running_loop().time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.05)
    if pending:
        log.error("registry tasks did not end when cancelled",
                  extra={"tasks": sorted(t.get_name() for t in pending)})


def _is_auth_error(exc: BaseException) -> bool:
    # A server with a password answers NOAUTH/WRONGPASS; redis-py raises
    # AuthenticationError for most, a plain ResponseError for some.
    return isinstance(exc, AuthenticationError) or (
        isinstance(exc, ResponseError) and str(exc).upper().startswith(("NOAUTH", "WRONGPASS", "INVALID USERNAME")))


def _describe(exc: BaseException) -> str:
    return mask_text(f"{type(exc).__name__}: {exc}")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


async def _bounded(closing: Awaitable[Any], timeout: float) -> None:
    """Await a close for `timeout` at most; a connection that is already dead has nothing to release."""
    try:
        async with asyncio.timeout(timeout):
            await closing
    except _FAILURES:
        pass
