"""`[groups.NAME.rollout]`: how a group's config changes are staged. Pure logic."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from gateway.settings import ConfigError, Errors, unknown_keys

__all__ = ["RolloutSpec", "parse_rollout", "ROLLOUT_KEYS"]

ROLLOUT_KEYS = ("canary", "bake", "max_error_rate", "max_latency_ratio", "min_requests")
_SHARE = re.compile(r"([0-9]+(?:\.[0-9]+)?)%")


@dataclass(frozen=True)
class RolloutSpec:
    """A canary of `canary` clients (or `share` of them), judged for `bake` seconds."""

    canary: int = 0          # a number of clients; 0 when `share` is used
    share: float = 0.0       # a share of the group's clients (0..1]
    bake: float = 60.0
    max_error_rate: float = 0.05
    max_latency_ratio: float = 2.0
    min_requests: int = 20

    def canary_size(self, clients: int) -> int:
        """How many of `clients` are canaries: at least one when there is any, never all
        of a group of two or more (the rest is what the canary is compared with)."""
        if clients <= 0:
            return 0
        # The share's float noise (0.07 * 100 = 7.000000000000001) must not round up to one more.
        wanted = self.canary if self.canary else math.ceil(round(self.share * clients, 9))
        return max(1, min(wanted, clients - 1 if clients > 1 else 1))

    def describe(self) -> str:
        return f"{self.canary} client(s)" if self.canary else f"{self.share * 100:g}% of the clients"

    def to_json(self) -> dict[str, Any]:
        return {"canary": self.canary or f"{self.share * 100:g}%", "bake": self.bake,
                "max_error_rate": self.max_error_rate, "max_latency_ratio": self.max_latency_ratio,
                "min_requests": self.min_requests}


def parse_rollout(raw: Any, file: str, key: str) -> RolloutSpec | None:
    """The group's rollout table, or None (a change goes to every client at once)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(file, key, f"must be a table, got {raw!r}")
    errors = Errors()
    for exc in unknown_keys(raw, ROLLOUT_KEYS, file, key):
        errors.add(exc)
    canary, share = 1, 0.0
    value = raw.get("canary", 1)
    match = _SHARE.fullmatch(value) if isinstance(value, str) else None
    if match is not None and 0 < float(match.group(1)) <= 100:
        canary, share = 0, float(match.group(1)) / 100
    elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
        errors.add(ConfigError(file, f"{key}.canary",
                               f"must be a number of clients (1 or more) or a share like \"25%\", got {value!r}"))
    else:
        canary = value
    numbers: dict[str, float] = {}
    for name, default, low, what in (("bake", 60.0, 0.0, "seconds, 0 or more"),
                                     ("max_error_rate", 0.05, 0.0, "a share from 0 to 1"),
                                     ("max_latency_ratio", 2.0, 1.0, "a ratio of 1 or more"),
                                     ("min_requests", 20, 0, "a whole number, 0 or more")):
        v = raw.get(name, default)
        bad = isinstance(v, bool) or not isinstance(v, (int, float)) or v < low or not math.isfinite(v)
        if name == "max_error_rate" and not bad and v > 1:
            bad = True
        if name == "min_requests" and not isinstance(v, int):
            bad = True
        if bad:
            errors.add(ConfigError(file, f"{key}.{name}", f"must be {what}, got {v!r}"))
            v = default
        numbers[name] = v
    errors.raise_any()
    return RolloutSpec(canary=canary, share=share, bake=float(numbers["bake"]),
                       max_error_rate=float(numbers["max_error_rate"]),
                       max_latency_ratio=float(numbers["max_latency_ratio"]), min_requests=int(numbers["min_requests"]))
