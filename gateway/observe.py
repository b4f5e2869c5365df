"""What happened to each request: the access record, the access log, metrics.

One `AccessRecord` per request at an HTTP entry (the gateway's public entry
or a client's local entry); when the request ends it becomes one access log
line and a handful of metric updates.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
import urllib.parse
from typing import Any, Protocol

import orjson

__all__ = ["AccessRecord", "AccessLog", "RateWindow", "RequestMetrics", "NO_METRICS", "mask_query"]

log = logging.getLogger("gateway.access")


# A query parameter whose name holds one of these (api_key, access_token, X-Amz-Signature)
# carries a credential: its value never reaches the access log.
_SECRET_PARAM = re.compile(r"token|key|secret|passw|sig|auth", re.IGNORECASE)
MASK = "***"


def mask_query(target: str) -> str:
    """`target` (path and query) with the values of credential-like parameters masked."""
    path, sep, query = target.partition("?")
    if not sep or not _SECRET_PARAM.search(query):
        return target
    parts = query.split("&")
    for i, part in enumerate(parts):
        name, eq, value = part.partition("=")
        if eq and value and _SECRET_PARAM.search(urllib.parse.unquote_plus(name)):
            parts[i] = f"{name}={MASK}"
    return f"{path}?{'&'.join(parts)}"


class AccessRecord:
    __slots__ = ("started", "request_id", "trace_id", "method", "host", "path", "status", "bytes_in", "bytes_out",
                 "duration", "group", "rule", "client_id", "worker", "direction", "error", "retried", "remote",
                 "user_agent")

    def __init__(self, *, request_id: str, trace_id: str, method: str, host: str, path: str, worker: str,
                 direction: str) -> None:
        self.started = time.time()
        self.request_id = request_id
        self.trace_id = trace_id
        self.method = method
        self.host = host
        self.path = path
        self.worker = worker
        self.direction = direction
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.duration = 0.0
        self.group = ""
        self.rule = ""
        self.client_id = ""
        self.error = ""
        self.retried = False  # the tunnel was lost before any response byte and the request went again
        self.remote = ""  # the caller's address (the peer of the connection)
        self.user_agent = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.started)) + f".{int(self.started % 1 * 1000):03d}Z",
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "method": self.method,
            "host": self.host,
            "path": mask_query(self.path),
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration": round(self.duration, 6),
            "group": self.group,
            "rule": self.rule,
            "client_id": self.client_id,
            "worker": self.worker,
            "direction": self.direction,
            "error": self.error,
            "retried": self.retried,
            "remote": self.remote,
            "user_agent": self.user_agent,
        }


class AccessLog:
    """One JSON line per request to stdout or a file, or nothing ('off').

    Lines are buffered and written whole, at most every 50 ms, with O_APPEND,
    so workers sharing a file never interleave within a line."""

    FLUSH_INTERVAL = 0.05
    MAX_BUFFER = 64 * 1024

    def __init__(self, target: str) -> None:
        self.target = target
        self._fd: int | None = None
        self._buf: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        if target == "stdout":
            self._fd = sys.stdout.fileno()
        elif target != "off":
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def write(self, record: AccessRecord) -> None:
        if self._fd is None:
            return
        line = orjson.dumps(record.as_dict(), option=orjson.OPT_APPEND_NEWLINE)
        self._buf.append(line)
        self._size += len(line)
        if self._size >= self.MAX_BUFFER:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buf or self._fd is None:
            return
        # Write in pieces that end on line boundaries.
        data = b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except OSError as exc:
            log.error("access log write failed: %s", exc)

    def close(self) -> None:
        self.flush()
        if self._fd is not None and self.target not in ("stdout", "off"):
            os.close(self._fd)
        self._fd = None


class RateWindow:
    """Requests and errors of the last minute, in one-second buckets."""

    __slots__ = ("_buckets", "_second")

    def __init__(self) -> None:
        self._buckets = [[0, 0] for _ in range(60)]
        self._second = int(time.time())

    def _advance(self, now: int) -> None:
        if now - self._second >= 60:
            for b in self._buckets:
                b[0] = b[1] = 0
        else:
            for s in range(self._second + 1, now + 1):
                b = self._buckets[s % 60]
                b[0] = b[1] = 0
        self._second = now

    def add(self, error: bool) -> None:
        now = int(time.time())
        if now != self._second:
            self._advance(now)
        b = self._buckets[now % 60]
        b[0] += 1
        if error:
            b[1] += 1

    def last_minute(self) -> dict[str, int]:
        self._advance(max(self._second, int(time.time())))
        return {"requests": sum(b[0] for b in self._buckets), "errors": sum(b[1] for b in self._buckets)}


class RequestMetrics(Protocol):
    def observe(self, record: AccessRecord) -> None: ...


class _NoMetrics:
    def observe(self, record: AccessRecord) -> None:
        return None


NO_METRICS = _NoMetrics()
