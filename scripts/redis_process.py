"""A real redis-server process on a free loopback port (or another address given), nothing saved to disk,
ready when it answers PING (polled, never a fixed sleep); it can be stopped and
started again on the same port. The tests' fixture (tests/redis_server.py) and
the fleet benchmark (scripts/bench_fleet.py) both start theirs with it.
Debian's `redis-server` package; .ci/run installs it."""
from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
from pathlib import Path

from bench_stack import free_port, wait_until

__all__ = ["INSTALL_HINT", "RedisServer", "RedisUnavailable", "find_redis_server"]

INSTALL_HINT = "redis-server is not installed (Debian: apt-get install redis-server; CI's .ci/run does)"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class RedisUnavailable(RuntimeError):
    """There is no redis-server to start."""


def find_redis_server() -> str:
    """The redis-server executable (RedisUnavailable, saying how to install it, when there is none)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RedisUnavailable(INSTALL_HINT)
    return exe


class RedisServer:
    """One redis-server process: `start()`, `stop()`, `start()` again on the same port.
    `url` is what a client dials (with the password, when one is required)."""

    def __init__(self, tmp: Path, password: str | None = None, port: int | None = None, exe: str | None = None,
                 host: str = "127.0.0.1") -> None:
        self.exe = exe or find_redis_server()
        self.dir = tmp
        self.host = host  # the one address it binds (and a client dials)
        self.password = password
        self.port = port or free_port()
        self.log = tmp / f"redis-{self.port}.log"
        self.popen: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def url_with(self, password: str) -> str:
        return f"redis://:{password}@{self.host}:{self.port}/0"

    def start(self) -> None:
        if self.popen is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [self.exe, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.dir)]
        if self.password:
            args += ["--requirepass", self.password]
        elif not ipaddress.ip_address(self.host).is_loopback:
            args += ["--protected-mode", "no"]  # else it refuses every client not on loopback
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_until(self._answers, timeout=START_TIMEOUT, what=f"redis-server on port {self.port}")
        except BaseException:
            self.stop()  # a server that never answered is not left running
            raise

    def _answers(self) -> bool:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.popen.returncode}:\n{self.output()[-2000:]}")
        with socket.create_connection((self.host, self.port), timeout=1.0) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = s.recv(64)
        # +PONG, or -NOAUTH from a server that wants a password: either way it serves.
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def stop(self) -> None:
        """Stop the server (its data goes with it: nothing is saved)."""
        popen, self.popen = self.popen, None
        if popen is None or popen.poll() is not None:
            return
        popen.terminate()
        try:
            popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(STOP_TIMEOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
