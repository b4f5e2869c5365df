"""Per-group and per-rule limits: in-flight, body size, request rate. Pure logic.

Rates are per worker process: a gateway with N workers divides a configured
rate (and burst) by N, since the kernel spreads connections evenly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

from gateway.settings import ConfigError

__all__ = ["Limits", "LIMIT_KEYS", "parse_limits", "TokenBucket", "LimitGate"]

LIMIT_KEYS = frozenset({"max_inflight", "max_body_bytes", "rate", "burst"})


@dataclass(frozen=True, slots=True)
class Limits:
    max_inflight: int = 0      # 0: no limit
    max_body_bytes: int = 0    # 0: the global max_body_bytes
    rate: float = 0.0          # requests per second; 0: no limit
    burst: float = 0.0         # bucket size; default: max(1, rate)

    @property
    def empty(self) -> bool:
        return not (self.max_inflight or self.max_body_bytes or self.rate)


def parse_limits(table: Mapping[str, Any], file: str, key: str) -> Limits:
    values: dict[str, Any] = {}
    for name in ("max_inflight", "max_body_bytes"):
        v = table.get(name, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(file, f"{key}.{name}", "must be a non-negative integer")
        values[name] = v
    for name in ("rate", "burst"):
        v = table.get(name, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(file, f"{key}.{name}", "must be a non-negative number")
        values[name] = float(v)
    if values["burst"] and not values["rate"]:
        raise ConfigError(file, f"{key}.burst", "needs a rate")
    return Limits(**values)


class TokenBucket:
    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0.0 when a token was taken, else seconds until one is there."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class LimitGate:
    """The live state of one scope's limits (a group or a rule) in one worker."""

    __slots__ = ("limits", "inflight", "bucket")

    def __init__(self, limits: Limits, share: int = 1) -> None:
        self.limits = limits
        self.inflight = 0
        self.bucket = None
        if limits.rate:
            rate = limits.rate / share
            self.bucket = TokenBucket(rate, max(1.0, (limits.burst or limits.rate) / share))

    def admit(self) -> tuple[str, float] | None:
        """None when the request may go; else (error code, retry-after seconds)."""
        if self.limits.max_inflight and self.inflight >= self.limits.max_inflight:
            return "overloaded", 1.0
        if self.bucket is not None:
            wait = self.bucket.take()
            if wait:
                return "rate_limited", wait
        self.inflight += 1
        return None

    def release(self) -> None:
        self.inflight -= 1
