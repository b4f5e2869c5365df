"""The processes scripts/bench.py measures: the bench backend, the gateway,
one tunnel client (and nginx on request), on free loopback ports, plus their
CPU time and resident memory read from /proc.

Its first part is the one process harness of the benchmarks and the tests
(tests/harness.py imports it): start a process with its log, wait for it to be
ready, stop it, free ports, JSON from an admin port. It lives here, not in a
module of its own, because scripts/bench_ab.py loads each compared version's
bench_stack.py from that version's checkout: the file must be whole by itself."""
from __future__ import annotations

import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    from bench_load import LoadResult, LoadSpec

__all__ = ["BenchStack", "NOT_READY", "ProcGroup", "ProcessExited", "Processes", "RssSampler", "children_of",
           "cpu_seconds_of", "free_port", "get_json", "load_with_cpu", "process_tree", "wait_until"]

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the process harness (the benchmarks' and the tests') ------------------------------------

_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, never the same one twice in this process:
    the kernel may hand a just-released port out again, and two of our listeners
    sharing one (SO_REUSEPORT) would split its connections between them."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def get_json(url: str, timeout: float = 5.0) -> Any:
    """The JSON a GET of `url` answers; an answer other than 2xx raises urllib's HTTPError."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def children_of(pid: int) -> list[int]:
    """The direct children of a process (read from /proc)."""
    return _children().get(pid, [])


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it (read from /proc)."""
    kids = _children()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def cpu_seconds_of(pid: int) -> float:
    """One process's CPU seconds (user + system), 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class ProcGroup:
    """A process we started and its descendants (the gateway is a supervisor, a router and
    workers), with its output (stdout and stderr) in `log`."""

    def __init__(self, name: str, popen: subprocess.Popen, log: Path) -> None:
        self.name, self.popen, self.log = name, popen, log

    def pids(self) -> list[int]:
        return process_tree(self.popen.pid) if self.popen.poll() is None else []

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds_of(p) for p in self.pids())

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL to the whole tree if it is not gone within `timeout`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in self.pids():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.popen.wait(5)

    def kill(self) -> None:
        """SIGKILL to the process alone (its children see it crash)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


class Processes:
    """Owns every process a run (or a test) starts, each with its log in `tmp`;
    close() stops them all, whatever failed before."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[ProcGroup] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> ProcGroup:
        log = self.tmp / f"{name}.log"
        n = 1
        while log.exists():  # a restarted process keeps its own log
            n += 1
            log = self.tmp / f"{name}.{n}.log"
        with log.open("wb") as fh:
            popen = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                                     start_new_session=True)
        proc = ProcGroup(name, popen, log)
        self.procs.append(proc)
        return proc

    def close(self, timeout: float = 15.0) -> None:
        """Stop every process, the last started first; one that will not stop does not keep the rest running."""
        errors: list[BaseException] = []
        for p in reversed(self.procs):
            try:
                p.stop(timeout)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def dump(self) -> str:
        return "\n".join(f"===== {p.name} ({p.log.name}) =====\n{p.output()[-4000:]}" for p in self.procs)


class ProcessExited(RuntimeError):
    """A process a wait was watching exited before the wait was over."""


# What a check may raise while a server is not up yet, or half up: refused or reset
# connections, URL errors (an HTTPError too: a 503 while starting), timeouts, a
# dropped or garbled HTTP answer, half-written JSON. Anything else is a failure.
NOT_READY: tuple[type[BaseException], ...] = (ConnectionError, urllib.error.URLError, TimeoutError,
                                              http.client.HTTPException, json.JSONDecodeError)


def wait_until(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, what: str = "condition",
               watch: ProcGroup | Iterable[ProcGroup | None] | None = (),
               ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """Poll `check` until it returns something true, and return that. A process of `watch`
    that exits meanwhile ends the wait at once (ProcessExited, with its output); an
    exception of `check` other than NOT_READY (and `ignore`) propagates at once."""
    watched = [watch] if isinstance(watch, ProcGroup) else [p for p in (watch or ()) if p is not None]
    tolerated = NOT_READY + tuple(ignore)
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
            last_exc = None  # the last poll answered: an earlier error is not why it waits
        except tolerated as exc:
            last_exc = exc
        for p in watched:
            if not p.alive():
                raise ProcessExited(f"{p.name} exited (code {p.popen.returncode}) while waiting for {what}; "
                                    f"its output ({p.log}):\n{p.output()[-4000:]}")
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    logs = "".join(f"\n--- {p.name} ({p.log}):\n{p.output()[-3000:]}" for p in watched)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}"
                       + (f" (last error: {last_exc!r})" if last_exc else "") + logs)


# -- what the benchmarks measure -----------------------------------------------------------


class RssSampler:

    """Samples the resident memory of each process of some groups; keeps each group's peak."""

    def __init__(self, groups: dict[str, ProcGroup], interval: float = 0.05) -> None:
        self.groups, self.interval = groups, interval
        self.peak: dict[str, float] = {name: 0.0 for name in groups}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, group in self.groups.items():
                for pid in group.pids():
                    self.peak[name] = max(self.peak[name], _rss_mb(pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def routable(shards: list[dict[str, Any]]) -> bool:
    """Every worker sees every stream of every group, its own or through the router
    (`shards`: GET /admin/shards's workers)."""
    totals: dict[str, int] = {}
    for w in shards:
        for g, n in w["streams"].items():
            totals[g] = totals.get(g, 0) + n
    return all(w.get("sees", {}) == totals for w in shards)


def drain_all_but(admin_url: str, counts: dict[int, int], worker: int) -> None:
    """Drain the streams of every worker but `worker` (`counts`: streams by worker); their
    clients reconnect wherever the kernel puts them, so repeat until all sit on it."""
    for w, n in counts.items():
        if w != worker and n:
            request = urllib.request.Request(f"{admin_url}/admin/drain", data=json.dumps({"worker": w}).encode(),
                                             method="POST", headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=5).close()


class BenchStack:
    """Starts and stops the measured processes; every one it starts is stopped by close()."""

    def __init__(self, tmp: Path, host: str = "127.0.0.1") -> None:
        self.tmp = tmp
        self.host = host  # the gateway's (its admin port's too) and what the client dials
        self.procs = Processes(tmp)
        self.backend_port = free_port()
        self.http_port = self.tunnel_port = self.admin_port = 0
        self.local_port = self.client_admin_port = self.nginx_port = 0
        self.backend: ProcGroup | None = None
        self.gateway: ProcGroup | None = None
        self.client: ProcGroup | None = None
        self.settings: list[str] = []

    def sibling(self, host: str) -> "BenchStack":
        """Another gateway (with its client) on `host`, beside this one: the same backend, settings
        and processes (this stack's close() stops its processes too)."""
        other = BenchStack(self.tmp, host)
        other.procs, other.backend_port, other.settings = self.procs, self.backend_port, self.settings
        return other

    # -- processes -------------------------------------------------------
    def start_process(self, name: str, args: list[str], cwd: Path = ROOT) -> ProcGroup:
        """Start a process of the run (its log in the run's directory); close() stops it."""
        return self.procs.start(name, args, cwd=cwd)

    def wait_ready(self, what: str, group: ProcGroup | Iterable[ProcGroup | None], check: Callable[[], Any],
                   timeout: float = 30.0) -> None:
        """wait_until `check`, watching `group` (one process or several); exit (SystemExit, with
        the process's log) if one dies or the time runs out."""
        try:
            wait_until(check, timeout, what=what, watch=group)
        except (ProcessExited, TimeoutError) as exc:
            raise SystemExit(f"bench: {exc}") from None

    def start_backend(self) -> ProcGroup:
        group = self.start_process("backend", [sys.executable, "scripts/demo_backend.py", "--port", str(self.backend_port)])
        self.wait_ready("backend", group, lambda: get_json(f"{self.backend_url}/stats"))
        self.backend = group
        return group

    def start_gateway(self, workers: int, force_cross_worker: bool = False, name: str = "gateway",
                      **settings: Any) -> ProcGroup:
        """The gateway with `workers` workers; `settings` (values) and `self.settings` (raw TOML lines)
        go into its [gateway] table."""
        self.http_port, self.tunnel_port, self.admin_port = free_port(), free_port(), free_port()
        config = self.tmp / f"gateway-{len(self.procs.procs)}.toml"
        extra = "\n".join([f"{k} = {json.dumps(v)}" for k, v in settings.items()] + self.settings)
        config.write_text(f"""
[gateway]
host = "{self.host}"
admin_host = "{self.host}"
http_port = {self.http_port}
grpc_port = 0
tunnel_port = {self.tunnel_port}
admin_port = {self.admin_port}
workers = {workers}
force_cross_worker = {"true" if force_cross_worker else "false"}
max_body_bytes = {4 << 30}
request_timeout = 60.0
access_log = "off"
log_level = "warning"
{extra}

[groups.bench]
tokens = ["{TOKEN}"]

[groups.bench.upstreams.web]
servers = ["{self.backend_url}"]

[[groups.bench.rules]]
path_prefix = "/"
upstream = "web"

[[routes]]
name = "bench"
path_prefix = "/"
group = "bench"
timeout = 60.0

[upstreams.backend]
servers = ["{self.backend_url}"]

[[forward]]
name = "backend"
path_prefix = "/"
upstream = "backend"
""")
        group = self.start_process(name, [sys.executable, "-m", "gateway.cli", "-c", str(config)])
        self.wait_ready("gateway", group, lambda: get_json(f"{self.admin_url}/healthz"))
        self.gateway = group
        return group

    def start_client(self, connections: int, extra: Iterable[str] = ()) -> ProcGroup:
        """The tunnel client of group bench on this gateway, `extra` its further flags."""
        self.local_port, self.client_admin_port = free_port(), free_port()
        group = self.start_process("client", [
            sys.executable, "-m", "gateway.client.main", "--server", f"{self.host}:{self.tunnel_port}",
            "--group", "bench", "--token", TOKEN, "--client-id", "bench-client",
            "--connections", str(connections), "--local-port", str(self.local_port),
            "--admin-port", str(self.client_admin_port), "--max-body-bytes", str(4 << 30),
            "--request-timeout", "60", "--access-log", "off", "--log-level", "warning", *extra,
        ])
        self.wait_ready("client", group, lambda: self.streams_per_worker() and sum(self.streams_per_worker().values()) >= connections)
        self.client = group
        return group

    def start_nginx(self) -> ProcGroup | None:
        """nginx as a plain reverse proxy in front of the backend, when it is installed."""
        nginx = shutil.which("nginx")
        if nginx is None:
            return None
        self.nginx_port = free_port()
        prefix = self.tmp / "nginx"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(f"""
worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_max_body_size 0;
    proxy_request_buffering off;
    proxy_buffering off;
    upstream backend {{ server 127.0.0.1:{self.backend_port}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{self.nginx_port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
        group = self.start_process("nginx", [nginx, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"])
        self.wait_ready("nginx", group, lambda: urllib.request.urlopen(f"http://127.0.0.1:{self.nginx_port}/hello", timeout=2))
        return group

    def stop_tunnel(self) -> None:
        """Stop the client and the gateway (the backend keeps running for the next configuration)."""
        for group in (self.client, self.gateway):
            if group is not None:
                group.stop()
        self.client = self.gateway = None

    def close(self) -> None:
        self.procs.close()

    # -- state -------------------------------------------------------------
    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    @property
    def url(self) -> str:
        """The gateway's HTTP entry."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    def shards(self) -> list[dict]:
        return get_json(f"{self.admin_url}/admin/shards")["workers"]

    def streams_per_worker(self) -> dict[int, int]:
        return {w["worker"]: sum(w["streams"].values()) for w in self.shards()}

    def cross_frames(self) -> int:
        return sum(w["cross_frames_in"] + w["cross_frames_out"] for w in self.shards())

    def crowd_streams(self, worker: int, expected: int) -> None:
        """Drain the other workers until all `expected` streams sit on `worker` (a client started
        with --no-spread-workers stays so), as the kernel may place a client's connections."""

        def crowded() -> bool:
            counts = self.streams_per_worker()
            if sum(counts.values()) < expected:
                return False
            if counts.get(worker, 0) == expected:
                return routable(self.shards())
            drain_all_but(self.admin_url, counts, worker)
            return False

        try:
            wait_until(crowded, 60, interval=0.3, what=f"every stream on worker {worker}",
                       watch=(self.gateway, self.client))
        except (ProcessExited, TimeoutError) as exc:
            raise SystemExit(f"bench: could not put every stream on worker {worker}: {exc}") from None

    def spread_streams(self, workers: int) -> None:
        """Make every worker own a stream (so every request can stay local), with the rebalance script."""

        def spread() -> bool:
            counts = self.streams_per_worker()
            if len(counts) >= workers and min(counts.values()) >= 1:
                return True
            # Half a stream: 2 streams on one of 2 workers are within 1 of the mean, so the
            # script's default leaves them; 0.5 moves one (as even as whole streams allow).
            subprocess.run([sys.executable, "scripts/rebalance.py", "--admin", self.admin_url, "--tolerance", "0.5"],
                           cwd=ROOT, capture_output=True, timeout=60)
            return False

        try:
            wait_until(spread, 60, interval=0.2, what="a stream on every worker", watch=(self.gateway, self.client))
        except (ProcessExited, TimeoutError) as exc:
            raise SystemExit(f"bench: could not give every worker a stream: {exc}") from None


def load_with_cpu(generator: str, spec: "LoadSpec", workdir: Path,
                  groups: dict[str, ProcGroup]) -> tuple["LoadResult", dict[str, float]]:
    """One load run, and the CPU microseconds a request of each group and of the
    load generator itself ("load generator": wrk and hey are children of this
    process, reaped inside the window; the python driver runs in it). Nothing
    else may reap a child of this process during the run."""
    from bench_load import run_load

    who = resource.RUSAGE_SELF if generator == "python" else resource.RUSAGE_CHILDREN
    before = {k: g.cpu_seconds() for k, g in groups.items()}
    r0 = resource.getrusage(who)
    result = run_load(generator, spec, workdir)
    r1 = resource.getrusage(who)
    cpu = {k: g.cpu_seconds() - before[k] for k, g in groups.items()}
    cpu["load generator"] = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    n = max(result.requests, 1)
    return result, {k: v / n * 1e6 for k, v in cpu.items()}
