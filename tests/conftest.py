from __future__ import annotations

import pytest

from tests.harness import Processes, Stack, standard_stack


@pytest.fixture
def procs(tmp_path, request):
    p = Processes(tmp_path)
    yield p
    failed = getattr(request.node, "rep_call", None)
    p.close()
    if failed is not None and failed.failed:
        print(p.dump())


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def stack(procs, tmp_path) -> Stack:
    """Backend, gateway (one worker) and client c1 of group g1, all running."""
    return standard_stack(procs, tmp_path)


@pytest.fixture
def empty_stack(procs, tmp_path) -> Stack:
    return Stack(procs, tmp_path)
