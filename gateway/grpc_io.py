"""Which of gRPC's two I/O engines a process uses. Choose before grpc is imported.

gRPC's EventEngine (its default since 1.6x) reads sockets on its own threads
and hands each completed read to the thread that waits on the completion queue
(grpc.aio's poller thread), which wakes the asyncio loop: two thread hops a
message. Its older polling engine (iomgr) reads on the waiting thread itself:
one hop fewer. A tunnel carries many small messages, so on a busy machine that
hop is worth about 0.01 ms of CPU a request on each side and 5-20 % of the rate
(docs/performance.md). Both engines pass the same tests; EventEngine stays one
setting away (`grpc_event_engine = true`) should a later grpcio drop iomgr.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import MutableMapping

__all__ = ["IOMGR_EXPERIMENTS", "choose_grpc_io", "grpc_io_in_use"]

log = logging.getLogger("gateway.grpc_io")

# gRPC core experiments that, turned off, put sockets back on iomgr's polling.
IOMGR_EXPERIMENTS = ("event_engine_client", "event_engine_listener")


def choose_grpc_io(event_engine: bool, environ: MutableMapping[str, str] = os.environ) -> str:
    """Set GRPC_EXPERIMENTS for the chosen engine and return its value.

    An experiment the user already names in GRPC_EXPERIMENTS is left as they set it.
    """
    current = environ.get("GRPC_EXPERIMENTS", "")
    names = [n.strip() for n in current.split(",") if n.strip()]
    if not event_engine:
        named = {n.lstrip("+-") for n in names}
        names += [f"-{e}" for e in IOMGR_EXPERIMENTS if e not in named]
    value = ",".join(names)
    if value != current:
        if "grpc" in sys.modules:
            # gRPC reads its experiments once; too late for this process.
            log.warning("grpc already imported: GRPC_EXPERIMENTS=%s not applied", value)
        environ["GRPC_EXPERIMENTS"] = value
    return value


def grpc_io_in_use(environ: MutableMapping[str, str] = os.environ) -> str:
    """"iomgr" or "event_engine": the engine GRPC_EXPERIMENTS selects (for status pages)."""
    names = {n.strip() for n in environ.get("GRPC_EXPERIMENTS", "").split(",")}
    return "iomgr" if all(f"-{e}" in names for e in IOMGR_EXPERIMENTS) else "event_engine"
