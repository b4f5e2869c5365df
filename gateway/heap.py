"""The heap of a process that serves requests: the garbage collector's settings
and the C allocator's.

The collector: CPython collects its youngest generation every 700 new container
objects and its oldest one whenever enough objects have survived; a request
through the tunnel makes tens of them (frames, heads, futures, records), and the
oldest generation holds everything the process made to start (modules, grpc,
aiohttp, the config): tens of thousands of objects walked on every full
collection. Measured under wrk at concurrency 64, collection took about 5 % of a
worker's CPU and 9 % of a client's.

The allocator: glibc's malloc hands a block of 128 KiB or more out as fresh pages
(mmap) and gives a freed heap top back to the kernel; a 1 MiB tunnel message
assembled from its reads then cost its pages' faults and zeroing every time
(about 100 page faults a 1 MiB response in a worker). Blocks up to
`MMAP_THRESHOLD` now come from the heap, and up to `TRIM_THRESHOLD` of free heap
is kept for the next message. What each bought: docs/performance.md, "The heap, the windows, the interpreter".
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import logging

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "YOUNG_THRESHOLD", "keep_large_blocks", "refreeze_soon", "settle_heap"]

log = logging.getLogger(__name__)

# New container objects between young collections (CPython's default is 700):
# a few hundred requests' worth, still a small fraction of a process's memory.
YOUNG_THRESHOLD = 10_000
# Above a tunnel message's usual size (a batch is at most max_batch_bytes).
MMAP_THRESHOLD = 4 << 20
# Free heap a process keeps: a few messages' worth, well within its memory budget.
TRIM_THRESHOLD = 16 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
# Seconds after a config change before the heap is frozen anew (refreeze_soon).
REFREEZE_AFTER = 10.0
_refreeze: asyncio.TimerHandle | None = None


def settle_heap() -> None:
    """Call once the process has started to serve: what it made to start is kept
    out of every later collection (gc.freeze), young collections run less often
    (cycles are still found and freed, in larger batches), and large blocks are
    reused instead of mapped afresh."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    keep_large_blocks()


def refreeze_soon(delay: float = REFREEZE_AFTER) -> None:
    """After a config change: what the old config held was frozen with the rest, and
    frozen cycles are never freed. In `delay` seconds (the old rules' tasks ended),
    the frozen objects go back to the collector, the dead are freed and the living
    frozen again; what the old config's requests still hold then goes at the next
    change. Another change within the delay moves the time on."""
    global _refreeze
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # not serving: nothing was frozen
    if _refreeze is not None:
        _refreeze.cancel()
    _refreeze = loop.call_later(delay, _refreeze_now)


def _refreeze_now() -> None:
    global _refreeze
    _refreeze = None
    if gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()
        gc.freeze()


def keep_large_blocks() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap and keep some free
    heap; False where the C library has no mallopt (musl, macOS): nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mapped = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    kept = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not (mapped and kept):
        log.debug("mallopt refused a threshold: the allocator keeps its default there")
    return mapped and kept
