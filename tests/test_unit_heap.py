"""gateway.heap: what a serving process does to its garbage collector once started."""
from __future__ import annotations

import asyncio
import gc
import platform
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from gateway.heap import YOUNG_THRESHOLD, refreeze_soon, settle_heap


class Cycle:
    pass


def test_settle_heap_freezes_what_start_made_and_collects_young_objects_less_often():
    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        young, older, oldest = gc.get_threshold()
        assert young == YOUNG_THRESHOLD > before[0]
        assert (older, oldest) == before[1:]
        # A cycle made after start is still freed.
        a, b = Cycle(), Cycle()
        a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_what_a_config_change_replaced_is_freed_though_it_was_frozen_at_start():
    old_rules = Cycle()
    old_rules.me = old_rules  # a cycle: only the collector frees it
    gone = weakref.ref(old_rules)
    before = gc.get_threshold()

    async def change() -> None:
        nonlocal old_rules
        settle_heap()  # old_rules is frozen with the rest
        old_rules = None
        gc.collect()
        assert gone() is not None  # frozen: a collection does not see it
        refreeze_soon(0.01)
        refreeze_soon(0.05)  # a second change moves the time on
        await asyncio.sleep(0.02)
        assert gone() is not None
        await asyncio.sleep(0.1)

    try:
        asyncio.run(change())
        assert gone() is None
        assert gc.get_freeze_count() > 0  # the living are frozen again
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


_ROUNDS = """
import resource, sys
from gateway.heap import keep_large_blocks
if sys.argv[1] == "keep":
    assert keep_large_blocks()
def rounds(n):
    for _ in range(n):  # eight 1 MiB messages in flight, then none
        blocks = [bytes(1 << 20) for _ in range(8)]
        del blocks
rounds(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_large_blocks_are_reused_instead_of_mapped_afresh():
    def page_faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent)
        return int(out.stdout)

    # By default the freed heap goes back to the kernel and comes back as fresh
    # pages (thousands of faults in 20 rounds here); kept, the next messages reuse it.
    assert page_faults("default") > 1000
    assert page_faults("keep") < 100
