"""gateway.heap: what a serving process does to its garbage collector once started."""
from __future__ import annotations

import gc

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
