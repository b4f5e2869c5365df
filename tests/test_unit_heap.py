"""gateway.heap: what a serving process does to its garbage collector once started."""
from __future__ import annotations

import ctypes.util
import gc
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.heap import YOUNG_THRESHOLD, settle_heap


def test_settle_heap_freezes_what_start_made_and_collects_young_objects_less_often():
    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        young, older, oldest = gc.get_threshold()
        assert young == YOUNG_THRESHOLD > before[0]
        assert (older, oldest) == before[1:]

        class Cycle:
            pass

        # A cycle made after start is still freed: collected, not kept frozen.
        a, b = Cycle(), Cycle()
        a.other, b.other = b, a
        frozen = gc.get_freeze_count()
        del a, b
        assert gc.collect() >= 2
        assert gc.get_freeze_count() == frozen
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


@pytest.mark.skipif(ctypes.util.find_library("c") is None or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_large_blocks_are_reused_instead_of_mapped_afresh():
    def page_faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent)
        return int(out.stdout)

    # By default the freed heap goes back to the kernel and comes back as fresh
    # pages (thousands of faults in 20 rounds here); kept, the next messages reuse it.
    assert page_faults("default") > 1000
    assert page_faults("keep") < 100
