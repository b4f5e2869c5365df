"""What a tunnel peer got wrong (a frame for a request it never had, a body
past its window, a bad request head), logged with the peer's name but never
so often that a peer can flood the log: a burst, then one line a second."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.tunnel.stream import TunnelStream

__all__ = ["FaultLog"]

log = logging.getLogger("gateway.tunnel")

BURST = 10
PER_SECOND = 1.0


class FaultLog:
    """One stream's faults: all counted, a burst of BURST logged, then PER_SECOND."""

    __slots__ = ("count", "suppressed", "_tokens", "_at")

    def __init__(self) -> None:
        self.count = 0
        self.suppressed = 0
        self._tokens = float(BURST)
        self._at = time.monotonic()

    def report(self, stream: "TunnelStream", problem: str, request_id: str = "", trace_id: str = "",
               level: int = logging.WARNING) -> None:
        self.count += 1
        now = time.monotonic()
        self._tokens = min(float(BURST), self._tokens + (now - self._at) * PER_SECOND)
        self._at = now
        if self._tokens < 1.0:
            self.suppressed += 1
            return
        self._tokens -= 1.0
        log.log(level, "tunnel peer %s: %s", stream.peer_id, problem, extra={
            "client_id": stream.peer_id, "group": stream.group, "connection": stream.label,
            "request_id": request_id, "trace_id": trace_id, "faults": self.count, "suppressed": self.suppressed})
        self.suppressed = 0
