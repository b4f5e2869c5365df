"""The garbage collector's settings for a process that serves requests.

CPython collects its youngest generation every 700 new container objects and
its oldest one whenever enough objects have survived; a request through the
tunnel makes tens of them (frames, heads, futures, records), and the oldest
generation holds everything the process made to start (modules, grpc, aiohttp,
the config): tens of thousands of objects walked on every full collection.
Measured under wrk at concurrency 64 (docs/performance.md, "The garbage
collector"), collection took about 5 % of a worker's CPU and 9 % of a client's,
most of it in those full walks and in young collections of a few objects each.
"""
from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "settle_heap"]

# New container objects between young collections (CPython's default is 700):
# a few hundred requests' worth, still a small fraction of a process's memory.
YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Call once the process has started to serve: what it made to start is
    kept out of every later collection (gc.freeze), and young collections run
    less often. Cycles are still found and freed, only in larger batches."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
