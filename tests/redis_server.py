"""A real redis-server for tests: scripts/redis_process.py's (on a free loopback
port, nothing saved to disk, ready when it answers PING; stopped and started
again on the same port, which is how a test makes Redis go away and come back),
with the test skipped, saying why, where redis-server is not installed."""
from __future__ import annotations

from pathlib import Path

import pytest

import tests.harness  # noqa: F401  (puts scripts/ on sys.path)
from redis_process import RedisServer as _RedisServer, RedisUnavailable, find_redis_server

__all__ = ["RedisServer", "require_redis_server"]


def require_redis_server() -> str:
    """The redis-server executable; the calling test is skipped, saying why, when there is none."""
    try:
        return find_redis_server()
    except RedisUnavailable as exc:
        pytest.skip(str(exc))


class RedisServer(_RedisServer):
    """scripts/redis_process.py's RedisServer; its test is skipped where redis-server is missing."""

    def __init__(self, tmp: Path, password: str | None = None, port: int | None = None,
                 host: str = "127.0.0.1") -> None:
        super().__init__(tmp, password, port, exe=require_redis_server(), host=host)
