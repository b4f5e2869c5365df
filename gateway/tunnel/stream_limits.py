"""The sizes and bounds of one tunnel stream (re-exported by `stream`)."""
from __future__ import annotations

__all__ = ["StreamLimits"]


class StreamLimits:
    """Sizes and bounds of one stream. The window must be the same at both ends: a client
    takes the gateway's (its WELCOME says it), workers' channels share a setting."""

    __slots__ = ("max_inflight", "window", "chunk_size", "max_batch_bytes", "max_queue_bytes", "body_queue_bytes",
                 "heartbeat_interval")

    def __init__(
        self,
        *,
        max_inflight: int = 1000,
        window: int = 256 * 1024,
        chunk_size: int = 64 * 1024,
        max_batch_bytes: int = 1024 * 1024,
        max_queue_bytes: int = 8 * 1024 * 1024,
        heartbeat_interval: float = 5.0,
    ) -> None:
        self.max_inflight = max_inflight
        self.window = window
        self.chunk_size = chunk_size
        self.max_batch_bytes = max_batch_bytes
        self.max_queue_bytes = max_queue_bytes
        # Bodies wait at half the queue: the other half is for heads, credit and control.
        self.body_queue_bytes = max(1, max_queue_bytes // 2)
        self.heartbeat_interval = heartbeat_interval
