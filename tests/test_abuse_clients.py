"""Abuse from fake tunnel clients built from the proto, against one real gateway
(two workers) while real clients of two other groups serve (issue 17).

Groups: `evil`, whose token the attacker holds; `alpha` and `beta`, each with a
real tunnel-client process and its own aiohttp backend. Two probers GET
/alpha/stats and /beta/stats through the public entry for the whole module,
checking each answer comes from their group's backend. Meanwhile, one after the
other: garbage before HELLO and on an open stream, a bad and a missing token,
alpha's client id (in alpha's group with evil's token, and in evil's group),
forged response heads, frames for request ids never sent, DATA beyond the
window granted (both directions), an oversize message. Each drops only the
offending request or stream, the gateway logs why (JSON lines), and at the end
the probers saw only 200s from their own backends, and alpha's and beta's
clients are the same processes on the same connections. A RESET that crosses
workers reaches the client with its reason; a window violation is logged with
its reason and client. Stray frames are counted on the stream
(/admin/clients) and logged at info within bounds (most are races)."""
from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import pytest

from gateway.tunnel import frames
from tests.harness import Stack, get_json, http, shards, wait_until
from tests.test_bad_input import GARBAGE, RawTunnel
from tests.test_forged_heads import (BAD, CUT, MARKERS, RecordingConnection, _forged_then_next, _is_bad_response,
                                     _one)
from tests.test_tunnel_identity import EVIL_TOKEN, FakeClient

TOKENS = {"evil": EVIL_TOKEN, "alpha": "alpha-group-token", "beta": "beta-group-token"}
WINDOW = 64 * 1024
SETTINGS = {"workers": 2, "stream_window": WINDOW, "chunk_size": 16 * 1024,
            # Room for every refused HELLO of this module from 127.0.0.1 (the default is 10 a minute):
            # the real clients reconnect from that address too.
            "tunnel_failed_hellos_per_source": 100}
# The largest message the tunnel port takes with these settings (workers/listeners.py).
MAX_MESSAGE = (1 << 20) * 2 + 16384 + 16 * 1024 + (1 << 20)

# Well-formed protobuf that is no HELLO: refused like undecodable bytes.
GARBAGE_MESSAGES = {
    "empty batch": b"",
    "ping first": frames.encode_frame(frames.ping(1, ack=False, inflight=0)),
    "welcome from a client": frames.encode_frame(frames.welcome(accepted=True)),
    "two hellos": frames.encode_frame(frames.hello(client_id="evil", group="evil", token=EVIL_TOKEN, version="x",
                                                   capabilities=[], connection_index=0)) * 2,
}


# -- the stack and the probers ------------------------------------------------------------------


class Prober(threading.Thread):
    """GETs /GROUP/stats through the public entry until halted; each answer is recorded as
    "200" when it is a 200 from the group's own backend (by its pid), else as what it was."""

    def __init__(self, stack: Stack, group: str, backend_pid: int) -> None:
        super().__init__(name=f"prober-{group}", daemon=True)
        self.url = f"{stack.url}/{group}/stats"
        self.backend_pid = backend_pid
        self.seen: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                r = http("GET", self.url, timeout=10)
                own = r.status == 200 and r.json().get("pid") == self.backend_pid
                self.seen.append("200" if own else f"{r.status} {r.body[:200]!r}")
            except Exception as exc:  # recorded: the verdict is the test's
                self.seen.append(repr(exc))
            self.halt.wait(0.01)  # pacing only: two CPUs are shared with the gateway

    def wrong(self) -> list[str]:
        return [s for s in list(self.seen) if s != "200"]


@dataclass
class World:
    stack: Stack
    probers: list[Prober]
    clients: dict[str, tuple[int, list[tuple[str, float]]]]  # alpha/beta -> (pid, [(connection, connected_at)])
    workers: list[int]

    def all_200_so_far(self) -> None:
        for p in self.probers:
            assert not p.wrong(), (p.name, p.wrong()[:5])

    def wait_probes(self, n: int) -> None:
        """Each prober answers `n` more times (while an attack holds)."""
        base = [len(p.seen) for p in self.probers]
        wait_until(lambda: all(len(p.seen) >= b + n for p, b in zip(self.probers, base)), 20,
                   what=f"{n} more probes", watch=self.stack.gateway)
        self.all_200_so_far()


def _streams(stack: Stack, group: str = "evil") -> list[dict]:
    """The group's client streams, as the worker that answers /admin/clients sees them."""
    return [r for r in get_json(f"http://127.0.0.1:{stack.admin_port}/admin/clients")["clients"]
            if r["group"] == group]


def _connections(stack: Stack, group: str) -> list[tuple[str, float]]:
    return sorted((r["connection"], r["connected_at"]) for r in _streams(stack, group))


@pytest.fixture(scope="module")
def world(make_module_stack):
    backend_pids: dict[str, int] = {}

    def three_groups(stack: Stack, doc: dict) -> None:
        urls = {"evil": stack.backend_url}
        for group in ("alpha", "beta"):
            own = Stack(stack.procs, stack.tmp)
            backend_pids[group] = own.start_backend(f"backend-{group}").popen.pid
            urls[group] = own.backend_url
        doc["groups"] = {g: {"tokens": [TOKENS[g]], "upstreams": {"web": {"servers": [url]}},
                             "rules": [{"path_prefix": "/", "upstream": "web"}]} for g, url in urls.items()}
        doc["routes"] = [
            {"path_prefix": "/forged", "group": "evil", "timeout": 10.0},
            {"path_prefix": "/alpha", "group": "alpha", "strip_prefix": True, "timeout": 10.0},
            {"path_prefix": "/beta", "group": "beta", "strip_prefix": True, "timeout": 10.0},
            {"path_prefix": "/", "group": "alpha", "timeout": 10.0},  # the "next request" of test_forged_heads
        ]

    stack = make_module_stack(settings=SETTINGS, edit=three_groups, client=None)
    for group in ("alpha", "beta"):
        stack.start_client(group, group=group, token=TOKENS[group])
    probers = [Prober(stack, g, backend_pids[g]) for g in ("alpha", "beta")]
    for p in probers:
        p.start()
    try:
        # Their two connections each and no other (a stream a move let go gone from the gateway's view too).
        wait_until(lambda: all(len(_connections(stack, g)) == 2 for g in ("alpha", "beta")), 15,
                   what="alpha's and beta's two connections", watch=stack.gateway)
        clients = {g: (stack.clients[g][0].popen.pid, _connections(stack, g)) for g in ("alpha", "beta")}
        world = World(stack, probers, clients, sorted(w["pid"] for w in shards(stack)))
        world.wait_probes(5)
        yield world
    finally:
        for p in probers:
            p.halt.set()
        for p in probers:
            p.join(15)


# -- the fake client ------------------------------------------------------------------------------


class Evil(RawTunnel):
    """test_bad_input's hand-driven tunnel connection. Once a HELLO is accepted a task reads
    on into `got` (answering PINGs, so the gateway keeps the stream); writes take turns,
    as gRPC takes one at a time."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.got: list[frames.Frame] = []
        self.ended = asyncio.Event()
        self._turn = asyncio.Lock()
        self._pump: asyncio.Task | None = None
        self.row: dict = {}  # its stream as /admin/clients shows it, once routable

    async def send(self, raw: bytes) -> None:
        async with self._turn:
            await super().send(raw)

    async def join(self, client_id: str = "evil", group: str = "evil", token: str = EVIL_TOKEN) -> frames.pb.Welcome:
        welcome = await self.hello(client_id, group, token, capabilities=("http", frames.HEADER_FIELDS))
        if welcome.accepted:
            self._pump = asyncio.get_running_loop().create_task(self._read_on())
        return welcome

    async def _read_on(self) -> None:
        while (batch := await self.read(timeout=3600)) is not None:
            self.got += batch
        self.ended.set()

    async def frame(self, match: Callable[[Any], bool], what: str, timeout: float = 10.0) -> Any:
        """The first frame received that `match`es (polled), taken out of `got`."""
        async with asyncio.timeout(timeout):
            while True:
                for i, f in enumerate(self.got):
                    if match(f):
                        return self.got.pop(i)
                assert not self.ended.is_set(), f"the gateway ended the call before {what}: {self.got}"
                await asyncio.sleep(0.01)

    async def request(self, name: str) -> frames.Frame:
        """The head of the gateway's request for /forged/NAME."""
        return await self.frame(lambda f: f.WhichOneof("kind") == "headers" and not f.reply
                                and f.headers.path == f"/forged/{name}", f"the request for /forged/{name}")

    async def reset_of(self, rid: str) -> frames.pb.Reset:
        f = await self.frame(lambda f: f.request_id == rid and f.WhichOneof("kind") == "reset", f"a RESET of {rid}")
        return f.reset

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        await super().close()


async def _joined(stack: Stack) -> Evil:
    """An Evil accepted into group evil (once any before it are gone) and routable from every worker."""
    await asyncio.to_thread(wait_until, lambda: not _streams(stack), what="no evil stream", watch=stack.gateway)
    evil = Evil(stack.tunnel_port)
    welcome = await evil.join()
    assert welcome.accepted, welcome
    assert welcome.window == WINDOW
    rows = await asyncio.to_thread(wait_until, lambda: stack.routable() and _streams(stack),
                                   what="evil's stream routable", watch=stack.gateway)
    assert len(rows) == 1, rows
    evil.row = rows[0]
    return evil


def _stayed(stack: Stack, evil: Evil) -> None:
    """Evil's stream is still the one it joined with (polled: another worker's view of it may lag)."""
    wait_until(lambda: [r["connected_at"] for r in _streams(stack)] == [evil.row["connected_at"]],
               what="evil's stream still up", watch=stack.gateway)


def _run(main: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(main(), 30))


# -- the gateway's log ----------------------------------------------------------------------------


def _lines(stack: Stack) -> list[dict]:
    out = []
    for line in stack.gateway.output().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # not JSON (or two processes' lines met)
    return out


def _matching(stack: Stack, msg: str, **fields: Any) -> list[dict]:
    """The log lines whose message starts with `msg` and that carry `fields`."""
    return [x for x in _lines(stack) if str(x.get("msg", "")).startswith(msg)
            and all(x.get(k) == v for k, v in fields.items())]


def _logged(stack: Stack, msg: str, n: int = 1, **fields: Any) -> list[dict]:
    """Wait for `n` log lines whose message starts with `msg` and that carry `fields`; return them."""

    def found() -> list[dict]:
        hits = _matching(stack, msg, **fields)
        return hits if len(hits) >= n else []

    return wait_until(found, 10, what=f"{n} log line(s) {msg!r} with {fields}", watch=stack.gateway)


# -- the abuse, one after the other -----------------------------------------------------------------


def test_garbage_is_refused_before_hello_and_closes_only_its_stream_after(world):
    stack = world.stack
    junk = [*GARBAGE, *GARBAGE_MESSAGES.values()]
    before = len(_matching(stack, "tunnel rejected", code="protocol_error"))

    async def main() -> list[frames.Frame]:
        for raw in junk:
            t = RawTunnel(stack.tunnel_port)
            try:
                await t.send(raw)
                answer = await t.read_all()
            finally:
                await t.close()
            # One WELCOME that refuses, then the call ends.
            assert [(f.WhichOneof("kind"), f.welcome.accepted, f.welcome.code) for f in answer] == [
                ("welcome", False, "protocol_error")], (raw, answer)
        evil = await _joined(stack)
        try:
            await evil.send(GARBAGE[0])
            await asyncio.wait_for(evil.ended.wait(), 10)
            return evil.got
        finally:
            await evil.close()

    rest = _run(main)
    _logged(stack, "tunnel rejected", before + len(junk), code="protocol_error", level="warning")
    # On an open stream: GOAWAY protocol_error, the stream closed and the reason logged.
    assert [(f.WhichOneof("kind"), f.goaway.reason) for f in rest] == [("goaway", "protocol_error")]
    _logged(stack, "closing tunnel: malformed batch", peer="evil")
    _logged(stack, "tunnel closed", peer="evil", reason="protocol_error", level="warning")
    wait_until(lambda: not _streams(stack), what="evil's stream dropped", watch=stack.gateway)
    world.all_200_so_far()


def test_a_bad_and_a_missing_token_are_refused(world):
    stack = world.stack
    cases = [  # (group, token, code the client is told, reason the gateway logs)
        ("evil", "sekrit-wrong-token-7", "bad_credentials", "bad_token"),
        ("evil", "", "missing_token", "missing_token"),
        ("no-such-group", EVIL_TOKEN, "bad_credentials", "unknown_group"),
    ]

    async def main() -> None:
        for group, token, code, _reason in cases:
            evil = Evil(stack.tunnel_port)
            try:
                welcome = await evil.join(client_id="evil", group=group, token=token)
                assert (welcome.accepted, welcome.code) == (False, code), (group, welcome)
                assert await evil.read() is None  # and the call ends
            finally:
                await evil.close()

    _run(main)
    for _group, _token, code, reason in cases:
        _logged(stack, "tunnel rejected", code=code, reason=reason, level="warning")
    assert "sekrit-wrong-token-7" not in stack.gateway.output() and EVIL_TOKEN not in stack.gateway.output()
    world.all_200_so_far()


def test_alphas_client_id_takes_nothing_over(world):
    stack = world.stack
    refusal = "tunnel rejected: token not valid for group 'alpha'"
    before = len(_matching(stack, refusal, reason="bad_token"))

    async def main() -> None:
        # In alpha's group with evil's token: refused.
        thief = Evil(stack.tunnel_port)
        try:
            welcome = await thief.join(client_id="alpha", group="alpha")
            assert (welcome.accepted, welcome.code) == (False, "bad_credentials")
        finally:
            await thief.close()
        # In evil's group, both of alpha's connection indexes: evil's own identity, accepted,
        # and alpha's connections and answers do not change while they are up.
        twins = [FakeClient(stack.tunnel_port) for _ in range(2)]
        try:
            for i, twin in enumerate(twins):
                assert (await twin.hello("alpha", "evil", EVIL_TOKEN, connection=i)).accepted
            await asyncio.to_thread(wait_until, lambda: len(_streams(stack)) == 2 and stack.routable(),
                                    what="both twins routable", watch=stack.gateway)
            await asyncio.to_thread(world.wait_probes, 10)
            assert not any(f.WhichOneof("kind") == "goaway" for twin in twins for f in twin.frames)
        finally:
            for twin in twins:
                await twin.close()

    _run(main)
    _logged(stack, refusal, before + 1, reason="bad_token", level="warning")
    assert _connections(stack, "alpha") == world.clients["alpha"][1]
    assert "took over" not in stack.clients["alpha"][0].output()
    assert "duplicate client identity" not in stack.gateway.output()
    wait_until(lambda: not _streams(stack), what="the twins gone", watch=stack.gateway)
    world.all_200_so_far()


# Forged response heads, as test_forged_heads.py sends them.
FORGED = ["crlf-split-in-value", "cl-shorter-than-body", "status-999", "status-101"]


def _origin(request_id: str) -> int:
    """The worker a request entered by (a gateway request id is INSTANCE-WORKER-SEQ, gateway/ids.py)."""
    return int(request_id.split("-")[1])


async def _forge(stack: Stack, evil: Evil, name: str) -> tuple[Any, Any, bytes, frames.pb.Reset | None]:
    """/forged/NAME, then /hello on the same connection (test_forged_heads), evil answering the first
    with BAD[NAME]: the two answers, every byte the caller got, and the RESET evil was told."""
    caller = asyncio.create_task(asyncio.to_thread(_forged_then_next, stack.http_port, name))
    head = await evil.request(name)
    batches = BAD[name](head.request_id, head.trace_id)
    if name not in CUT:
        batches = [batches[0][:1]]  # the head alone, its body never ends: the gateway must say stop
    for batch in batches:
        await evil.send_frames(*batch)
    first, second, seen = await caller
    return first, second, seen, None if name in CUT else await evil.reset_of(head.request_id)


@pytest.mark.parametrize("name", FORGED)
def test_a_forged_head_fails_only_its_request(world, name):
    stack = world.stack

    async def main() -> tuple[Any, Any, bytes, frames.pb.Reset | None, int]:
        evil = await _joined(stack)
        try:
            answers = await _forge(stack, evil, name)
            await asyncio.to_thread(_stayed, stack, evil)
            return *answers, evil.row["worker"]
        finally:
            await evil.close()

    first, second, seen, told, evils_worker = _run(main)
    for marker in MARKERS:
        assert marker not in seen.lower(), seen
    assert not isinstance(first, Exception), first
    rid = first[1]["x-request-id"]
    if name in CUT:
        # The body was cut at its declared length and the connection closed: no second response.
        assert (first[0], first[2]) == (200, b"hello"), first
        assert isinstance(second, Exception), second
    else:
        assert _is_bad_response(first) and json.loads(first[2])["client_id"] == "evil", first
        if _origin(rid) == evils_worker:  # across workers: see the next test
            assert told.code == "bad_response" and "invalid response head" in told.message, told
        assert not isinstance(second, Exception) and second[0] == 200, second  # the connection goes on
    _logged(stack, "bad response from tunnel client evil (group evil)", request_id=rid, code="bad_response",
            level="warning")
    world.all_200_so_far()


def test_a_forged_head_across_workers_tells_the_client_why(world):
    """The RESET bad_response of a request that entered by the other worker than evil's stream's."""
    stack = world.stack

    async def main() -> frames.pb.Reset:
        evil = await _joined(stack)
        try:
            for _ in range(20):  # the kernel picks the worker of each connection: one in two crosses
                first, _second, _seen, told = await _forge(stack, evil, "status-999")
                if _origin(first[1]["x-request-id"]) != evil.row["worker"]:
                    return told
            raise AssertionError("no request entered by the other worker in 20")
        finally:
            await evil.close()

    told = _run(main)
    assert (told.code, told.message) == ("bad_response", "the tunnel client sent an invalid response head: "
                                                         "status 999 is not 100-599")


def test_frames_for_request_ids_never_sent_are_counted_and_ignored(world):
    stack = world.stack
    stray = [
        frames.data("never-1", "t", b"stray body", end_stream=False, reply=False),
        frames.window("never-2", "t", 1 << 30, reply=False),
        frames.reset("never-3", "t", "cancelled", "", reply=False),
        frames.data("never-4", "t", b"stray answer", end_stream=True, reply=True),
        frames.window("never-5", "t", 1 << 30, reply=True),
        frames.reset("never-6", "t", "cancelled", "", reply=True),
        frames.response_head("never-7", "t", status=200, reason="OK", headers=[], end_stream=True),
        # Garbage messages, well formed: no kind at all, a second HELLO, a WELCOME.
        frames.pb.Frame(),
        frames.hello(client_id="alpha", group="alpha", token=EVIL_TOKEN, version="x", capabilities=[],
                     connection_index=0),
        frames.welcome(accepted=True),
    ]

    async def main() -> tuple[frames.pb.Reset, Any]:
        evil = await _joined(stack)
        try:
            await evil.send_frames(*stray[:5])  # one batch ...
            for f in stray[5:]:  # ... and one frame per message
                await evil.send_frames(f)
            # A request head without a method: that request is refused, nothing else.
            await evil.send_frames(frames.request_head("evil-1", "t", method="", path="/", scheme="http",
                                                       authority="h", headers=[], end_stream=True, timeout_ms=1000))
            refused = await evil.reset_of("evil-1")
            counted = [len(stray) + 1]  # each stray frame and the bad head, on evil's one stream (no log line)
            await asyncio.to_thread(wait_until, lambda: [r["unknown_frames"] for r in _streams(stack)] == counted,
                                    what="the stray frames counted", watch=stack.gateway)
            # The stream still serves: a request through the evil route gets evil's answer.
            caller = asyncio.create_task(asyncio.to_thread(_one, RecordingConnection(stack.http_port),
                                                           "/forged/fine", "evil.test"))
            head = await evil.request("fine")
            await evil.send_frames(frames.response_head(head.request_id, head.trace_id, status=200, reason="OK",
                                                        headers=[("Content-Length", "4")], end_stream=False),
                                   frames.data(head.request_id, head.trace_id, b"fine", end_stream=True, reply=True))
            return refused, await caller
        finally:
            await evil.close()

    refused, answer = _run(main)
    assert (refused.code, refused.message) == ("protocol_error", "bad or duplicate request head")
    assert not isinstance(answer, Exception) and (answer[0], answer[2]) == (200, b"fine"), answer
    world.all_200_so_far()


async def _over_the_window(stack: Stack, evil: Evil) -> tuple[Any, str, frames.pb.Reset, frames.pb.Reset]:
    """DATA one byte past the window granted, both ways: in evil's answer to /forged/over-window
    (ingress) and in its own request up-1 (egress). The caller's answer, the ingress request's id,
    and the RESETs evil was told."""
    over = b"w" * (WINDOW + 1)
    caller = asyncio.create_task(asyncio.to_thread(_one, RecordingConnection(stack.http_port),
                                                   "/forged/over-window", "evil.test"))
    head = await evil.request("over-window")
    await evil.send_frames(frames.response_head(head.request_id, head.trace_id, status=200, reason="OK", headers=[],
                                                end_stream=False),
                           frames.data(head.request_id, head.trace_id, over, end_stream=True, reply=True))
    down = await evil.reset_of(head.request_id)
    answer = await caller
    await evil.send_frames(frames.request_head("up-1", "t", method="POST", path="/sink", scheme="http", authority="h",
                                               headers=[("Host", "h")], end_stream=False, timeout_ms=5000),
                           frames.data("up-1", "t", over, end_stream=True, reply=False))
    return answer, head.request_id, down, await evil.reset_of("up-1")


def test_data_beyond_the_window_resets_only_that_request(world):
    stack = world.stack

    async def main() -> tuple[Any, str, frames.pb.Reset, frames.pb.Reset, int]:
        evil = await _joined(stack)
        try:
            answers = await _over_the_window(stack, evil)
            # The stream goes on: a good request on it is answered.
            await evil.send_frames(frames.request_head("up-2", "t", method="GET", path="/hello", scheme="http",
                                                       authority="h", headers=[("Host", "h")], end_stream=True,
                                                       timeout_ms=5000))
            fine = await evil.frame(lambda f: f.request_id == "up-2" and f.WhichOneof("kind") == "headers",
                                    "the answer to up-2")
            await asyncio.to_thread(_stayed, stack, evil)
            return *answers, fine.headers.status
        finally:
            await evil.close()

    answer, rid, down, up, fine = _run(main)
    for told in (down, up):
        assert (told.code, told.message) == ("protocol_error", "flow control window exceeded"), told
    # The caller's 200 had gone out with the head: its body is cut, short of its end.
    assert isinstance(answer, Exception), answer
    _logged(stack, "response body cut: protocol_error", request_id=rid, level="warning")
    assert fine == 200
    world.all_200_so_far()


def test_a_window_violation_is_logged_with_its_reason_and_client(world):
    stack = world.stack

    async def main() -> str:
        evil = await _joined(stack)
        try:
            return (await _over_the_window(stack, evil))[1]
        finally:
            await evil.close()

    rid = _run(main)
    # Where the RESET is pushed, a line would be logged first: no wait needed once evil has both.
    for request_id in (rid, "up-1"):
        assert any("flow control window exceeded" in str(x.get("msg")) and x.get("client_id") == "evil"
                   for x in _matching(stack, "", request_id=request_id)), request_id


def test_an_oversize_message_closes_only_that_stream(world):
    stack = world.stack

    async def main() -> grpc.StatusCode:
        evil = await _joined(stack)
        try:
            # A well-formed batch: one DATA frame half as big again as the limit (under gRPC's own, twice it).
            await evil.send_frames(frames.data("big", "t", b"\0" * (MAX_MESSAGE * 3 // 2), end_stream=True,
                                               reply=False))
            await asyncio.wait_for(evil.ended.wait(), 10)
            return await evil.call.code()
        finally:
            await evil.close()

    assert _run(main) == grpc.StatusCode.RESOURCE_EXHAUSTED
    _logged(stack, "tunnel closed", peer="evil", reason="message_too_large", level="warning")
    wait_until(lambda: not _streams(stack), what="evil's stream dropped", watch=stack.gateway)
    world.all_200_so_far()


# -- and through it all ---------------------------------------------------------------------------


def test_the_probers_saw_only_200s_and_alpha_and_beta_were_never_touched(world):
    stack = world.stack
    world.wait_probes(10)  # after the last attack too
    wait_until(lambda: all(len(p.seen) >= 50 for p in world.probers), 30, what="50 probes each",
               watch=stack.gateway)
    for p in world.probers:
        p.halt.set()
        p.join(15)
    world.all_200_so_far()
    for group, (pid, connections) in world.clients.items():
        proc = stack.clients[group][0]
        assert proc.alive() and proc.popen.pid == pid, proc.output()
        assert stack.client_status(group)["connections"] == 2
        assert _connections(stack, group) == connections  # the same connections: none dropped or replaced
        assert "took over" not in proc.output() and "reconnecting" not in proc.output()
    assert sorted(w["pid"] for w in shards(stack)) == world.workers  # no worker died
    assert "Traceback" not in stack.gateway.output()
    stack.wait_idle()
