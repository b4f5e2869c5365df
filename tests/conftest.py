from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.harness import STOP_TIMEOUT, Processes, Stack, standard_stack
from tests.redis_server import RedisServer


def _stop(procs: Processes, failed: bool) -> None:
    """Stop every process; print their logs (shown with the failure) when a test failed."""
    try:
        procs.close(STOP_TIMEOUT)
    finally:
        if failed:
            print(procs.dump())


@pytest.fixture
def procs(tmp_path, request):
    p = Processes(tmp_path)
    yield p
    _stop(p, any(getattr(getattr(request.node, f"rep_{when}", None), "failed", False) for when in ("setup", "call")))


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _factory(procs: Processes, tmp: Path) -> Callable[..., Stack]:
    made = 0

    def make(**options: Any) -> Stack:
        nonlocal made
        made += 1
        where = tmp if made == 1 else tmp / f"stack{made}"  # each its own gateway.toml
        where.mkdir(exist_ok=True)
        return standard_stack(procs, where, **options)

    return make


@pytest.fixture
def make_stack(procs, tmp_path) -> Callable[..., Stack]:
    """make_stack(**options): a standard_stack (harness.py) with those options, for this test;
    every process it starts is stopped after the test, passed or failed."""
    return _factory(procs, tmp_path)


@pytest.fixture(scope="module")
def make_module_stack(tmp_path_factory, request) -> Iterator[Callable[..., Stack]]:
    """The same for a stack a module's tests share (in a module-scoped fixture of the
    module's own): its processes are stopped after the module's last test, also when
    one failed (their logs are printed then) or when the stack did not start."""
    tmp = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    p = Processes(tmp)
    failed_before = request.session.testsfailed
    try:
        yield _factory(p, tmp)
    finally:
        _stop(p, request.session.testsfailed > failed_before)


@pytest.fixture
def stack(make_stack) -> Stack:
    """Backend, gateway (one worker) and client c1 of group g1, all running."""
    return make_stack()


@pytest.fixture
def empty_stack(procs, tmp_path) -> Stack:
    return Stack(procs, tmp_path)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port for the module's tests (tests/redis_server.py),
    stopped after its last test; the tests are skipped, saying why, where redis-server is not
    installed (CI installs it). Tests sharing it keep apart by key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    with server:
        yield server
