"""The supervisor's promises (issue 17, item 7), on real gateways: a worker that
cannot boot stops a multi-worker gateway with exit 3 (no traceback); a worker
that stops beating (SIGSTOP) is killed and respawned after worker_timeout; a
second SIGTERM that cuts requests in flight exits 1; nothing is left in the
temporary folder after a stop."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from tests.harness import (
    ROOT, Stack, children_of, free_port, get_json, http, proc_title, shards, to_toml, wait_until,
)


def _worker_pids(stack: Stack) -> dict[int, int]:
    return {w["worker"]: w["pid"] for w in shards(stack)}


async def _get(url: str, timeout: float = 60) -> tuple[int, str]:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url) as r:
                return r.status, await r.text()
    except aiohttp.ClientError as exc:
        return -1, type(exc).__name__


def test_boot_error_with_two_workers_exits_3_without_a_traceback(tmp_path):
    blocker = socket.socket()  # no SO_REUSEPORT: no worker can bind this port
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    stack = Stack(None, tmp_path)  # only for its config: nothing is started
    stack.backend_port = free_port()
    stack.http_port = blocker.getsockname()[1]
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(stack.gateway_doc(settings={"workers": 2})))
    try:
        out = subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    finally:
        blocker.close()
    # Refused before the workers start, or by the workers themselves: exit 3 either way, no traceback.
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    assert str(stack.http_port) in out.stdout + out.stderr


def test_a_worker_that_cannot_boot_while_another_drains_stops_the_gateway_with_3(make_stack, tmp_path):
    """Worker 0 serves slow requests while a respawned worker 1 fails its boot (its access
    log's folder is gone): the stop begins with a live worker to drain, not after both died."""
    logs = tmp_path / "logs"
    logs.mkdir()
    stack = make_stack(settings={"workers": 2, "access_log": str(logs / "access.log")})
    pids = wait_until(lambda: len(_worker_pids(stack)) == 2 and _worker_pids(stack), 10, what="both workers up",
                      watch=stack.gateway)

    async def scenario() -> list[tuple[int, str]]:
        # 16 connections: the kernel puts some on worker 0 (all on worker 1: 1 in 65536).
        tasks = [asyncio.ensure_future(_get(f"{stack.url}/slow?ms=5000&token=b{i}")) for i in range(16)]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: wait_until(
            lambda: http("GET", f"{stack.backend_url}/stats").json()["inflight"] >= 16, 10, what="all in flight"))
        (logs / "access.log").unlink()
        logs.rmdir()
        os.kill(pids[1], signal.SIGKILL)
        return await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert stack.gateway.popen.wait(30) == 3, stack.gateway.output()[-3000:]
    assert "Traceback" not in stack.gateway.output(), stack.gateway.output()[-3000:]
    assert "could not boot" in stack.gateway.output()


def test_a_stopped_worker_is_killed_and_respawned_after_worker_timeout(make_stack):
    stack = make_stack(settings={"workers": 2, "worker_timeout": 2.0})
    old = wait_until(lambda: len(_worker_pids(stack)) == 2 and _worker_pids(stack), 10, what="both workers up",
                     watch=stack.gateway)
    os.kill(old[1], signal.SIGSTOP)
    try:
        # Killed (a stopped process takes only SIGKILL) and replaced by a new process.
        wait_until(lambda: _worker_pids(stack).get(1, old[1]) != old[1], 20, what="worker 1 respawned",
                   watch=stack.gateway, ignore=(OSError,))
    finally:
        try:
            os.kill(old[1], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert old[1] not in children_of(stack.gateway.popen.pid)
    assert "silent for" in stack.gateway.output() and "worker_timeout" in stack.gateway.output()
    assert _worker_pids(stack)[0] == old[0], "the live worker was left alone"
    wait_until(lambda: stack.streams() >= 1 and stack.routable(), 15, what="client back", watch=stack.gateway)

    async def many() -> list[tuple[int, str]]:
        return await asyncio.gather(*(_get(f"{stack.url}/slow?ms=0&token=t{i}") for i in range(20)))

    assert [s for s, _ in asyncio.run(many())] == [200] * 20


def test_a_second_sigterm_that_cuts_a_request_exits_1(make_stack):
    stack = make_stack(settings={"workers": 1, "shutdown_grace": 30.0})
    sup = stack.gateway.popen

    async def scenario() -> tuple[int, str]:
        task = asyncio.ensure_future(_get(f"{stack.url}/slow?ms=20000&token=cut"))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: wait_until(
            lambda: http("GET", f"{stack.backend_url}/stats").json()["inflight"] >= 1, 10, what="request in flight"))
        sup.send_signal(signal.SIGTERM)
        await loop.run_in_executor(None, lambda: wait_until(
            lambda: "stopping: draining workers" in stack.gateway.output(), 10, what="drain begun"))
        sup.send_signal(signal.SIGTERM)
        return await task

    status, _ = asyncio.run(scenario())
    assert status != 200  # the second signal cut it
    assert sup.wait(15) == 1
    assert "second stop signal" in stack.gateway.output()


def test_sigterm_with_nothing_in_flight_still_exits_0_and_leaves_no_file_in_tmp(procs, tmp_path):
    # A short private TMPDIR (an ipc path must fit 107 bytes): the gateway's only temporary folder.
    tmp = Path(tempfile.mkdtemp(prefix="tg-"))
    try:
        stack = Stack(procs, tmp_path)
        stack.start_backend()
        stack.gateway_config = tmp_path / "gateway.toml"
        stack.gateway_config.write_text(to_toml(stack.gateway_doc(settings={"workers": 2})))
        stack.gateway = procs.start("gateway", [sys.executable, "-m", "gateway.cli", "-c", str(stack.gateway_config)],
                                    env={"TMPDIR": str(tmp)})
        wait_until(stack._gateway_ready, what="gateway /healthz", watch=stack.gateway)
        wait_until(lambda: get_json(f"http://127.0.0.1:{stack.admin_port}/admin/status")["router"], 10,
                   what="router connected", watch=stack.gateway)
        made = [p for p in tmp.rglob("*")]
        assert any(p.name.endswith(".router") for p in made), made  # the router's socket is in there
        router = [c for c in children_of(stack.gateway.popen.pid) if "router" in proc_title(c)][0]
        os.kill(router, signal.SIGKILL)  # a router that dies cannot clean up after itself
        wait_until(lambda: any("router" in proc_title(c) and c != router for c in children_of(stack.gateway.popen.pid)),
                   5, what="router respawned", watch=stack.gateway)
        stack.gateway.popen.send_signal(signal.SIGTERM)
        assert stack.gateway.popen.wait(20) == 0
        assert list(tmp.rglob("*")) == []
    finally:
        subprocess.run(["rm", "-rf", str(tmp)])
