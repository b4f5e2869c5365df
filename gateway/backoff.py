"""Exponential back-off with jitter, capped: how the client reconnects and how
a node retries its registry. Pure logic, no I/O."""
from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Exponential back-off with jitter (half to full of the step), capped."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * (2 ** self.attempt))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)
