"""Who a tunnel client is, and how many may knock: a client's identity is (group,
client_id[, certificate]), so a client of one group cannot evict another's; a refused
HELLO tells an unauthenticated client nothing about which groups exist, and the
refusals that no retry mends stop the client (exit 2); tunnel admission bounds new
connections and failed HELLOs per source address, and charges a group only for
authenticated HELLOs."""
from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time

import grpc
import grpc.aio
import pytest

from gateway.tunnel import frames
from gateway.tunnel.transport import ServerTransport, tunnel_handler
from tests.harness import TOKEN, Stack, get_json, http, wait_heartbeats, wait_until

CONNECT = "/tunnel.v1.Tunnel/Connect"
EVIL_TOKEN = "evil-group-token"
OTHER_TOKEN = "other-group-token"


def _tenants(stack: Stack, doc: dict) -> None:
    """Groups "other" (its own route, /echo/other) and "evil", beside g1."""
    web = {"web": {"servers": [stack.backend_url]}}
    rules = [{"path_prefix": "/", "upstream": "web"}]
    doc["groups"]["other"] = {"tokens": [OTHER_TOKEN], "upstreams": web, "rules": rules}
    doc["groups"]["evil"] = {"tokens": [EVIL_TOKEN], "upstreams": web, "rules": rules}
    doc["routes"] = [{"path_prefix": "/echo/other", "group": "other", "timeout": 10.0}, *doc["routes"]]


class FakeClient:
    """A tunnel connection built from the proto by hand: HELLO, then PINGs answered
    in the background so the gateway keeps the stream, until close()."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.call = self.channel.stream_stream(CONNECT)()
        self.frames: list[frames.Frame] = []
        self._pump: asyncio.Task | None = None

    async def hello(self, client_id: str, group: str, token: str, connection: int = 0,
                    instance: str = "") -> frames.pb.Welcome:
        await self.call.write(frames.encode_frame(frames.hello(
            client_id=client_id, group=group, token=token, version="test", capabilities=["http"],
            connection_index=connection, instance=instance)))
        raw = await asyncio.wait_for(self.call.read(), 10)
        assert raw is not grpc.aio.EOF, "the gateway ended the call without WELCOME"
        first = frames.decode_batch(raw)[0]
        assert first.WhichOneof("kind") == "welcome", first
        if first.welcome.accepted:
            self._pump = asyncio.get_running_loop().create_task(self._answer_pings())
        return first.welcome

    async def _answer_pings(self) -> None:
        while True:
            raw = await self.call.read()
            if raw is grpc.aio.EOF:
                return
            for f in frames.decode_batch(raw):
                self.frames.append(f)
                if f.WhichOneof("kind") == "ping" and not f.ping.ack:
                    await self.call.write(frames.encode_frame(frames.ping(f.ping.nonce, ack=True, inflight=0)))

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        self.call.cancel()
        await self.channel.close()


def _status(stack: Stack) -> str:
    return str(http("GET", f"{stack.url}/echo/other").status)


def test_another_groups_client_id_evicts_nothing(make_stack):
    stack = make_stack(settings={"workers": 1}, edit=_tenants)
    victim = stack.start_client("victim", group="other", token=OTHER_TOKEN)
    assert http("GET", f"{stack.url}/echo/other").status == 200

    async def attack() -> list[str]:
        # Group evil's valid token, the victim's client id, both its connection indexes.
        evil = [FakeClient(stack.tunnel_port) for _ in range(2)]
        try:
            for i, fake in enumerate(evil):
                assert (await fake.hello("victim", "evil", EVIL_TOKEN, connection=i)).accepted
            # A prober on group other while the evil streams are up, over several heartbeats.
            seen = [await asyncio.to_thread(_status, stack) for _ in range(20)]
            await asyncio.to_thread(wait_heartbeats, stack, 3, "c1")
            seen += [await asyncio.to_thread(_status, stack) for _ in range(20)]
            assert not any(f.WhichOneof("kind") == "goaway" for fake in evil for f in fake.frames)
            return seen
        finally:
            for fake in evil:
                await fake.close()

    seen = asyncio.run(attack())
    assert set(seen) == {"200"}, seen
    # The victim keeps both connections, never heard of a takeover, and runs on.
    assert victim.alive(), victim.output()
    assert stack.client_status("victim")["connections"] == 2
    assert "took over" not in victim.output()
    assert "duplicate client identity" not in stack.gateway.output()
    rows = get_json(f"http://127.0.0.1:{stack.admin_port}/admin/clients")["clients"]
    assert sorted(r["connection"] for r in rows if r["group"] == "other") == ["victim/0", "victim/1"]
    assert http("GET", f"{stack.url}/echo/other").status == 200


def test_a_connection_of_the_same_process_is_a_move_and_another_process_a_duplicate(make_stack):
    """The gateway tells a client moving its own connection (the same HELLO instance: to spread
    over the workers) from a second process with its identity. The moved one is sent nothing new
    but still carries what the client sends on it before it has switched (no GOAWAY, no drain)."""
    stack = make_stack(settings={"workers": 1})

    def goaways(fake: FakeClient) -> list[str]:
        return [f.goaway.reason for f in fake.frames if f.WhichOneof("kind") == "goaway"]

    def answer(fake: FakeClient, rid: str) -> frames.Frame | None:
        return next((f for f in fake.frames if f.request_id == rid and f.WhichOneof("kind") in ("headers", "reset")),
                    None)

    async def connect() -> tuple[frames.pb.Welcome, frames.Frame, list[str], list[str], list[str]]:
        fakes = [FakeClient(stack.tunnel_port) for _ in range(3)]
        try:
            welcome = await fakes[0].hello("mover", "g1", TOKEN, instance="proc-1")
            assert (await fakes[1].hello("mover", "g1", TOKEN, instance="proc-1")).accepted  # its move
            # An egress request on the old stream, sent as if before the client had read the new WELCOME.
            await fakes[0].call.write(frames.encode_frame(frames.request_head(
                "e1", "t1", method="GET", path="/hello", scheme="http", authority="backend", headers=[],
                end_stream=True, timeout_ms=5000)))
            await asyncio.to_thread(wait_until, lambda: answer(fakes[0], "e1"), 10, what="the egress answer")
            before_duplicate = goaways(fakes[0]) + goaways(fakes[1])
            assert (await fakes[2].hello("mover", "g1", TOKEN, instance="proc-2")).accepted  # a duplicate
            await asyncio.to_thread(wait_until, lambda: goaways(fakes[1]), 10, what="the duplicate's GOAWAY")
            return welcome, answer(fakes[0], "e1"), before_duplicate, goaways(fakes[0]), goaways(fakes[1])
        finally:
            for fake in fakes:
                await fake.close()

    welcome, egress, before, first, second = asyncio.run(connect())
    # WELCOME says which worker of how many, of which gateway: what a client spreads by.
    assert (welcome.worker, welcome.workers) == ("0", 1) and welcome.instance, welcome
    assert egress.WhichOneof("kind") == "headers" and egress.headers.status == 200, egress
    assert before == [] and first == [], (before, first)  # the move: no GOAWAY to either
    assert second == ["replaced_by_newer_connection"]  # the duplicate: the one it replaced goes
    log = stack.gateway.output()
    assert log.count("a client moved a connection") == 1
    assert log.count("duplicate client identity") == 1


# -- refusals as a client process sees them: fatal ones stop it, draining does not ----------


async def _fake_gateway(code: str, hellos: list[str]) -> tuple[grpc.aio.Server, int]:
    """A gateway that answers every HELLO with a refusal `code`, counting the HELLOs."""

    async def serve(transport: ServerTransport) -> None:
        raw = await transport.read()
        if raw is None:
            return
        hellos.append(frames.decode_batch(raw)[0].hello.client_id)
        await transport.write(frames.encode_frame(frames.welcome(accepted=False, code=code, message="refused")))

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([tunnel_handler(serve)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _client(procs, port: int, name: str):
    return procs.start(name, [
        sys.executable, "-m", "gateway.client.main", "--server", f"127.0.0.1:{port}", "--group", "g1",
        "--token", "sekrit-client-token", "--client-id", name, "--local-port", "0", "--connections", "1",
        "--reconnect-initial", "0.1", "--reconnect-max", "0.2"])


async def _poll(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("code", ["bad_credentials", "missing_token", "token_expired", "bad_certificate"])
def test_fatal_refusal_stops_the_client_with_status_2(procs, code):
    async def main() -> None:
        hellos: list[str] = []
        server, port = await _fake_gateway(code, hellos)
        try:
            proc = _client(procs, port, "refused")
            await _poll(lambda: not proc.alive(), 20, "the refused client to exit")
            assert proc.popen.returncode == 2, proc.output()
            out = proc.output()
            assert re.search(rf'"level":"error".*gateway refused this client \({code}: refused\).*stops', out), out
            assert "sekrit-client-token" not in out
            assert len(hellos) == 1
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_draining_refusal_is_retried_and_only_a_signal_exits_0(procs):
    async def main() -> None:
        hellos: list[str] = []
        server, port = await _fake_gateway("draining", hellos)
        try:
            proc = _client(procs, port, "patient")
            # Not fatal: it tries again, at its usual back-off (0.1-0.2 s here), and runs on.
            await _poll(lambda: len(hellos) >= 3 or not proc.alive(), 20, "three attempts")
            assert proc.alive(), proc.output()
            proc.popen.send_signal(signal.SIGTERM)
            await _poll(lambda: not proc.alive(), 20, "the client to stop")
            assert proc.popen.returncode == 0, proc.output()
        finally:
            await server.stop(0)

    asyncio.run(main())


# -- tunnel admission ------------------------------------------------------------------------


def _metric(stack: Stack, name: str, reason: str) -> float:
    text = http("GET", f"http://127.0.0.1:{stack.admin_port}/metrics").body.decode()
    m = re.search(rf'^{name}\{{reason="{reason}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


ADMISSION = {"workers": 1, "tunnel_failed_hellos_per_source": 3, "tunnel_max_streams_per_group": 2}


async def _refused(fake: FakeClient, *hello: str) -> grpc.aio.AioRpcError:
    """The call a HELLO gets when admission turns the connection away."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await fake.hello(*hello)
    return info.value


async def _guess(port: int, group: str, token: str) -> frames.pb.Welcome:
    """One HELLO on a connection of its own, closed after the answer."""
    fake = FakeClient(port)
    try:
        return await fake.hello("guesser", group, token)
    finally:
        await fake.close()


def test_admission_bounds_failed_hellos_per_source_and_streams_per_group(make_stack):
    # c1 of g1 holds its two connections: g1's bound here.
    stack = make_stack(settings=ADMISSION, edit=_tenants)

    async def main() -> None:
        # One group cannot take every stream: a third of g1's is turned away, valid token and all,
        # while another group's client still gets in.
        fake = FakeClient(stack.tunnel_port)
        try:
            err = await _refused(fake, "c9", "g1", TOKEN)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "admission" in err.details()
        finally:
            await fake.close()
        ok = FakeClient(stack.tunnel_port)
        try:
            assert (await ok.hello("o1", "other", OTHER_TOKEN)).accepted
        finally:
            await ok.close()
        # A token guesser gets three tries a minute from its address...
        for i in range(3):
            welcome = await _guess(stack.tunnel_port, "evil", f"guess-{i}")
            assert not welcome.accepted and welcome.code == "bad_credentials"
        # ... and the fourth connection is refused before it may send a HELLO.
        guess = FakeClient(stack.tunnel_port)
        try:
            err = await _refused(guess, "guesser", "evil", EVIL_TOKEN)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await guess.close()

    asyncio.run(main())
    assert _metric(stack, "tunnel_admission_refused_total", "group_streams") == 1
    assert _metric(stack, "tunnel_admission_refused_total", "source_failed_hellos") == 1
    log = stack.gateway.output()
    assert log.count("tunnel admission refused a connection") == 2
    assert '"reason":"group_streams"' in log and '"reason":"source_failed_hellos"' in log
    # Connected clients are not touched: c1 serves on.
    assert http("GET", f"{stack.url}/hello").status == 200
    assert stack.client_status("c1")["connections"] == 2


async def _relay_from(address: str, port: int) -> tuple[asyncio.AbstractServer, int]:
    """A TCP relay on 127.0.0.1 whose connections reach `port` from `address` (a
    gRPC channel binds no local address): the gateway sees that source."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


# Group bounds that three HELLOs would spend (and 20 s to refill one), were
# unauthenticated ones charged to the group they name.
PER_GROUP = {"workers": 1, "tunnel_failed_hellos_per_source": 100, "tunnel_failed_hellos_per_group": 3,
             "tunnel_connects_per_group": 3}


def test_a_guesser_naming_a_group_locks_out_only_its_own_address(make_stack):
    stack = make_stack(settings=PER_GROUP, edit=_tenants)

    async def flood(port: int, group: str) -> grpc.aio.AioRpcError:
        # Wrong tokens naming `group` until admission refuses: three tries a minute.
        for i in range(3):
            welcome = await _guess(port, group, f"guess-{i}")
            assert not welcome.accepted and welcome.code == "bad_credentials"
        fake = FakeClient(port)
        try:
            return await _refused(fake, "guesser", group, OTHER_TOKEN)
        finally:
            await fake.close()

    async def attack(group: str) -> grpc.aio.AioRpcError:
        relay, port = await _relay_from("127.0.0.2", stack.tunnel_port)
        try:
            return await flood(port, group)
        finally:
            relay.close()
            await relay.wait_closed()

    on_other = asyncio.run(attack("other"))
    assert on_other.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert '"peer":"ipv4:127.0.0.2:' in stack.gateway.output()  # the relay's source, not 127.0.0.1
    # Group other's client, valid token, from 127.0.0.1: in at once, both connections, and serving.
    victim = stack.start_client("victim", group="other", token=OTHER_TOKEN)
    assert http("GET", f"{stack.url}/echo/other").status == 200
    assert "refused" not in victim.output()
    assert _metric(stack, "tunnel_admission_refused_total", "group_failed_hellos") == 1
    assert _metric(stack, "tunnel_admission_refused_total", "group_connects") == 0
    # A group that does not exist is refused alike: nothing tells the guesser which one is real.
    on_nothing = asyncio.run(attack("nothing"))
    assert (on_nothing.code(), on_nothing.details()) == (on_other.code(), on_other.details())


# -- a duplicate identity across workers ------------------------------------------------------


def _worker_of(proc) -> str:
    lines = [json.loads(line) for line in proc.output().splitlines() if '"msg":"tunnel connected"' in line]
    assert lines, proc.output()
    return lines[-1]["worker"]


def test_duplicate_identity_on_another_worker_is_replaced_too(make_stack):
    # The kernel spreads connections over the two workers at random: start duplicates
    # until one lands on the other worker than the process it replaces (each does so with
    # probability 1/2); every replaced process, whichever worker, must exit 1.
    stack = make_stack(settings={"workers": 2}, client_extra=["--connections", "1"])
    old = stack.clients["c1"][0]
    crossed = False
    for attempt in range(12):
        stack.clients[f"old{attempt}"] = stack.clients.pop("c1")
        new = stack.start_client("c1", extra=["--connections", "1"])
        wait_until(lambda: not old.alive(), 15, what="the replaced client to exit", watch=new)
        assert old.popen.returncode == 1, old.output()
        assert "took over connection 0" in old.output()
        crossed = _worker_of(old) != _worker_of(new)
        if crossed:
            break
        old = new
    assert crossed, "no duplicate landed on the other worker in 12 tries"
    rows = get_json(f"http://127.0.0.1:{stack.admin_port}/admin/clients")["clients"]
    assert [r["connection"] for r in rows if not r["draining"]] == ["c1/0"]
    assert http("GET", f"{stack.url}/hello").status == 200
