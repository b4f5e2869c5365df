"""A worker's part in staged rollouts (gateway/rollout/).

Every worker keeps the node's book (which config version each client runs)
and pushes its own clients the version the book gives them. Worker 0 decides:
on a reload it starts a rollout for each group whose config changed and has a
rollout table, picks the canaries, judges them every TICK by the figures every
worker's entries count (asked for through the router, as /admin/history asks
for graphs) and by the versions the clients acknowledge (the shard table), then
promotes or rolls back. Each change is written to the state file and sent to
the other workers whole ("rollouts"); worker 0 sends it again every RESEND
seconds, so a worker respawned meanwhile catches up, and a respawned worker 0
takes the newest book of the state file and the other workers.

In a fleet one worker 0 decides for every node: that of the oldest serving
node (the fleet view every router shares; none while the registry is down, so
nothing changes then). It writes each book to the registry through its router
(gateway/cluster/rollout_store.py); every router hands the registry's book to
its workers, which take it as it is. A node's workers wait for that first book
(READY_WAIT at most) before they welcome a client of a group with a rollout
table, so a new node gives no client a version the fleet rolled back. The
deciding node reconciles its own file at start and on its reloads; another
node's reload changes nothing in a rollout (reload every node; the decider's
file is the one that counts). A deciding node lost hands the rollout, as it
is, to the next oldest.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Mapping

import orjson

from gateway.rollout.plan import Book, ClientState, Figures, GroupView
from gateway.rollout.state_file import load_book, save_book, state_path
from gateway.rollout.stats import process_rollout_stats
from gateway.workers.registry import stream_info

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.workers.worker import Worker

__all__ = ["Rollouts", "group_views", "LEADER", "ANSWERED_OPS"]

log = logging.getLogger("gateway.rollout")

LEADER = "w0"  # the worker of a node that decides its rollouts
TICK = 0.5  # seconds between two judgements of the rollouts in progress
RESEND = 2.0  # seconds between two sendings of an unchanged book to the other workers
ASK_TIMEOUT = 1.0  # how long worker 0 waits for another worker's figures
READY_WAIT = 3.0  # in a fleet: how long a worker waits at start for the fleet's book (see above)
# The commands through the router `Rollouts.answer` takes.
ANSWERED_OPS = ("rollouts", "rollout_stats", "rollout_book", "rollout_report", "rollout_decide")


def group_views(config: "GatewayConfig") -> dict[str, GroupView]:
    return {g: GroupView(spec.client.version, spec.client.to_json().decode(), spec.rollout)
            for g, spec in config.groups.items()}


class Rollouts:
    def __init__(self, worker: "Worker") -> None:
        self.worker = worker
        self.leader = worker.index == 0
        self.fleet = bool(worker.config.cluster)
        self._reconciled = not self.fleet  # one host: done at start; a fleet: once deciding with the fleet's book
        self.stats = process_rollout_stats()
        self._sent_at = 0.0  # when the book was last sent to the other workers
        self._save_failed = ""

    @property
    def book(self) -> Book:
        return self.worker.routing.book

    def _use(self, book: Book) -> None:
        """Run by `book` from now on: count for its canaries, push clients their versions."""
        self.worker.routing.book = book
        self.stats.watch({g: (r.new, r.canary) for g, r in book.rollouts.items() if r.state == "baking"})
        self.worker.routing.sync_configs()

    def start(self) -> None:
        cfg = self.worker.config
        book = load_book(self._path()) or Book()
        views = group_views(cfg)
        if self.leader and not self.fleet:
            self._events(book.reconcile({}, views, {}, time.time()))
        else:
            book.pin({}, views)
        self._use(book)
        ready = self.worker.routing.book_ready
        if self.fleet:
            asyncio.get_running_loop().call_later(READY_WAIT, ready.set)
            self.worker.link.on_rollouts = self.from_fleet
        else:
            ready.set()
        if self.leader:
            self.worker.spawn(self._run())

    @property
    def deciding(self) -> bool:
        """Does this worker decide the rollouts (of this host, or of the whole fleet)?"""
        return self.leader and (not self.fleet or self.decider() == LEADER)

    def decider(self) -> str | None:
        """Who decides: "w0" of this node, "NODE/w0" of another, None while the fleet is not known."""
        if not self.fleet:
            return LEADER
        fleet = self.worker.link.fleet if self.worker.link is not None else None
        if not fleet or not fleet.get("registry_up"):
            return None
        serving = [n for n in fleet.get("nodes", ()) if n.get("state") == "serving"]
        if not serving:
            return None
        oldest = min(serving, key=lambda n: (n.get("started", 0.0), n.get("node_id", "")))["node_id"]
        return LEADER if oldest == fleet.get("node_id") else f"{oldest}/{LEADER}"

    def from_fleet(self, raw: bytes) -> None:
        """The fleet's book as the registry has it (b"": none yet)."""
        routing = self.worker.routing
        if raw:
            try:
                book = Book.from_json(orjson.loads(raw))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("bad rollout book from the registry: %s", exc)
                return
            if book.revision > self.book.revision or (book.revision < self.book.revision and not self.deciding):
                book.pin({}, group_views(self.worker.config))
                self._use(book)
                if self.leader:
                    self._save()
        routing.book_ready.set()

    def _path(self) -> str:
        cfg = self.worker.config
        return state_path(cfg.rollout_state, cfg.path)

    # -- a reload ----------------------------------------------------------------

    def reload(self, old: "GatewayConfig", new: "GatewayConfig") -> None:
        """Before routing takes `new`: start rollouts (worker 0) or keep groups with
        a rollout table on the version they run until worker 0 says otherwise."""
        if self.deciding and self._reconciled:
            self._events(self.book.reconcile(group_views(old), group_views(new), self._connected(), time.time()))
            self._changed()
        else:
            self.book.pin(group_views(old), group_views(new))
            if self.leader and self.fleet:
                log.info("config reloaded on a node that does not decide rollouts: its rollout groups change "
                         "when the deciding node (%s) reloads", self.decider() or "not known yet")

    # -- worker 0 ----------------------------------------------------------------

    async def _run(self) -> None:
        await self._recover()
        while True:
            await asyncio.sleep(TICK)
            try:
                await self._tick()
            except Exception:  # a bad figure must not end the rollouts: logged, tried again next tick
                log.exception("rollout tick failed")

    async def _recover(self) -> None:
        """A respawned worker 0: the other workers may hold a newer book than the file."""
        link = self.worker.link
        if link is None:
            return
        for _ in range(20):
            if link.router_ok:
                break
            await asyncio.sleep(0.1)
        names = [n for n in link.table if n != LEADER]
        answers = await asyncio.gather(*(link.query(n, {"op": "rollout_book"}, ASK_TIMEOUT) for n in names))
        newest = max((a for a in answers if a), key=lambda a: a.get("revision", 0), default=None)
        if newest is not None and newest.get("revision", 0) > self.book.revision:
            book = Book.from_json(newest)
            book.pin({}, group_views(self.worker.config))
            log.info("rollouts recovered from another worker", extra={"revision": book.revision})
            self._use(book)
        self._changed()

    async def _tick(self) -> None:
        if not self.deciding or not self.worker.routing.book_ready.is_set():
            return
        book = self.book
        if not self._reconciled:  # the oldest node of a fleet, started: its file against the fleet's book
            self._reconciled = True
            before = book.revision
            self._events(book.reconcile({}, group_views(self.worker.config), self._connected(), time.time()))
            if book.revision != before:
                self._changed()
        busy = any(r.state == "baking" or not r.acknowledged for r in book.rollouts.values())
        if busy:
            before = book.revision
            figures = await self._figures()
            self._events(book.tick(figures, self._client_states(), time.time()))
            if book.revision != before:
                self._changed()
        if time.monotonic() - self._sent_at >= RESEND and (book.stable or book.rollouts):
            await self._send()

    def _changed(self) -> None:
        """The book changed: keep it, run by it, tell the other workers (and in a fleet the registry)."""
        self._save()
        self._use(self.book)
        self.worker.spawn(self._send())
        if self.fleet and self.deciding and self.worker.link is not None:
            self.worker.spawn(self.worker.link.send_rollouts(orjson.dumps(self.book.to_json()), self.book.revision))

    def _save(self) -> None:
        book = self.book
        if not (book.stable or book.rollouts or book.history) and not os.path.exists(self._path()):
            return  # no group has a rollout table: no file beside the user's config
        try:
            save_book(self._path(), self.book)
            self._save_failed = ""
        except OSError as exc:
            if str(exc) != self._save_failed:  # once per cause, not every tick
                log.warning("rollout state not saved (kept in memory only): %s", exc, extra={"file": self._path()})
            self._save_failed = str(exc)

    async def _send(self) -> None:
        link = self.worker.link
        self._sent_at = time.monotonic()
        if link is None:
            return
        command = {"op": "rollouts", "book": self.book.to_json()}
        for name in list(link.table):
            if name != LEADER:
                await link.send_command(name, command)

    def _events(self, events: list[dict[str, Any]]) -> None:
        metrics = getattr(self.worker, "metrics", None)
        for e in events:
            bad = e["event"] in ("rolling_back", "halted")
            log.log(logging.WARNING if bad else logging.INFO, "rollout %s: group %s version %s: %s",
                    e["event"].replace("_", " "), e["group"], e["version"], e["reason"], extra=e)
            if metrics is not None:
                metrics.rollouts.labels(e["group"], e["event"]).inc()

    def _rows(self) -> list[dict[str, Any]]:
        """Every client stream of the node: this worker's live, the others' from the table."""
        routing = self.worker.routing
        rows = [stream_info(s, routing.index) for s in routing.registry]
        link = self.worker.link
        if link is not None:
            for info in link.table.values():
                if info.get("worker") != routing.index:
                    rows += info.get("clients", ())
            for info in link.remote.values():  # a fleet's other nodes
                rows += info.get("clients", ())
        return rows

    def _connected(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for c in self._rows():
            if not c.get("draining"):
                out.setdefault(c["group"], []).append(c["client_id"])
        return out

    def _client_states(self) -> dict[str, dict[str, ClientState]]:
        """Per group and client: the version all its connections acknowledged ("" while
        they differ), and a refusal by any of them."""
        acked: dict[tuple[str, str], set[str]] = {}
        refused: dict[tuple[str, str], tuple[str, str]] = {}
        for c in self._rows():
            key = (c["group"], c["client_id"])
            acked.setdefault(key, set()).add(c.get("config_version", ""))
            if c.get("config_refused"):
                refused[key] = tuple(c["config_refused"])  # type: ignore[assignment]
        out: dict[str, dict[str, ClientState]] = {}
        for (g, cid), versions in acked.items():
            out.setdefault(g, {})[cid] = ClientState(next(iter(versions)) if len(versions) == 1 else "",
                                                     *refused.get((g, cid), ("", "")))
        return out

    async def _figures(self) -> dict[str, tuple[Figures, Figures]]:
        """Canary and rest figures of each rollout baking, every worker's added up."""
        snapshots = [self.stats.snapshot()]
        link = self.worker.link
        if link is not None:
            names = [n for n in link.table if n != LEADER] + list(link.remote)
            snapshots += await asyncio.gather(*(link.query(n, {"op": "rollout_stats"}, ASK_TIMEOUT) for n in names))
        out: dict[str, tuple[Figures, Figures]] = {}
        for g, r in self.book.rollouts.items():
            canary, rest = Figures(), Figures()
            for snap in snapshots:
                mine = (snap or {}).get(g)
                if mine and mine.get("version") == r.new:
                    canary.add(mine["canary"])
                    rest.add(mine["rest"])
            out[g] = (canary, rest)
        return out

    # -- what the other workers and the admin port ask ---------------------------

    def answer(self, command: Mapping[str, Any]) -> Any:
        """A command through the router: the book from worker 0, figures, the report, a decision."""
        op = command.get("op")
        if op == "rollouts":
            # Sent again every RESEND seconds: read whole only when it is another revision.
            if not self.leader and command["book"].get("revision") != self.book.revision:
                self._use(Book.from_json(command["book"]))
            return None
        if op == "rollout_stats":
            return self.stats.snapshot()
        if op == "rollout_book":
            return self.book.to_json()
        if op == "rollout_report":
            return self.report()
        if op == "rollout_decide":
            return self.decide(str(command.get("group")), str(command.get("action")), str(command.get("reason", "")))
        return None

    def report(self) -> dict[str, Any]:
        """/admin/rollouts: each group with a rollout table, its current or last rollout and the last ones."""
        now = time.time()
        book = self.book
        connected = self._connected()
        groups = {}
        for g, spec in self.worker.config.groups.items():
            if spec.rollout is None:
                continue
            r = book.rollouts.get(g)
            entry: dict[str, Any] = {"state": r.state if r is not None else "none",
                                     "stable": book.stable.get(g, (spec.client.version,))[0],
                                     "file": spec.client.version, "rejected": book.rejected.get(g),
                                     "spec": spec.rollout.to_json(), "clients": sorted(set(connected.get(g, ())))}
            if r is not None:
                entry.update(r.summary(now))
            entry["history"] = book.history.get(g, [])
            groups[g] = entry
        me = f"w{self.worker.index}"
        return {"groups": groups, "decided_by": f"{self.worker.config.node_id}/{me}" if self.fleet else me,
                "revision": book.revision}

    def decide(self, group: str, action: str, reason: str) -> dict[str, Any]:
        """Promote or roll back `group`'s rollout by hand; {"status": HTTP status, ...}."""
        if group not in self.worker.config.groups or self.worker.config.groups[group].rollout is None:
            return {"status": 404, "error": "unknown_group", "message": f"no group {group!r} with a rollout table"}
        if not self.deciding:  # a fleet whose view moved since the asker looked
            return {"status": 503, "error": "leader_unreachable",
                    "message": f"this worker does not decide rollouts (the decider is {self.decider()}); retry"}
        why = f"by hand{': ' + reason if reason else ''}"
        try:
            if action == "promote":
                events = self.book.promote(group, time.time(), why)
            else:
                events = self.book.roll_back(group, time.time(), why)
        except LookupError as exc:
            return {"status": 409, "error": "no_rollout", "message": str(exc)}
        self._events(events)
        self._changed()
        return {"status": 200, **self.report()["groups"][group]}
