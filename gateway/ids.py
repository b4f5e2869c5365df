"""Request ids and trace ids. Pure logic.

A gateway request id is `<instance>-<worker>-<seq>`: unique per gateway
incarnation, and it names the worker that originated it, for the logs and
the people reading them. (Responses find their way home by the channel the
request went out on, not by parsing the id.)
"""
from __future__ import annotations

import itertools
import os
import random
import re
from typing import Mapping

__all__ = ["RequestIds", "gateway_prefix", "new_instance_id", "new_trace_id", "trace_id_from"]

# W3C trace-context: version 00 is exactly these 55 characters; a later version
# may append fields after a '-', and version ff is invalid.
_TRACEPARENT = re.compile(r"(?!ff)([0-9a-f]{2})-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?", re.DOTALL)
_TRACE_ID = re.compile(r"[0-9A-Za-z._-]{1,64}")


def new_instance_id() -> str:
    return os.urandom(4).hex()


class RequestIds:
    __slots__ = ("prefix", "_seq")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._seq = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self._seq):x}"


def gateway_prefix(instance: str, worker: int) -> str:
    return f"{instance}-{worker}-"


def trace_id_from(headers: Mapping[str, str]) -> str:
    """The trace id of `traceparent` or `x-trace-id`, else a new one."""
    tp = headers.get("traceparent")
    if tp:
        m = _TRACEPARENT.fullmatch(tp.strip().lower())
        if m and m.group(2) != "0" * 32 and (m.group(1) != "00" or m.group(3) is None):
            return m.group(2)
    given = headers.get("x-trace-id")
    if given and _TRACE_ID.fullmatch(given):
        return given
    return new_trace_id()


def new_trace_id() -> str:
    """32 random hex digits, never all zeros (W3C: invalid). Python's generator
    (seeded from the OS, reseeded in a forked child) rather than os.urandom:
    a trace id needs to be unique, not secret, and getrandom() is a system
    call on every request."""
    return f"{random.getrandbits(128) or 1:032x}"
