"""Load generators for scripts/bench.py: wrk (preferred), hey, or a built-in
aiohttp driver. Each runs one (url, method, body, concurrency, duration) and
returns the same LoadResult."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["LoadResult", "LoadSpec", "Pacer", "pick_generator", "run_load", "INSTALL_HINT"]

INSTALL_HINT = "install wrk for accurate figures: apt-get install wrk (or hey: apt-get install hey)"

# wrk reports through a Lua `done` hook so nothing has to be scraped from its text.
WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"errors":%d,"non2xx":%d,' ..
    '"p50_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class LoadSpec:
    url: str
    concurrency: int
    duration: float
    method: str = "GET"
    body_size: int = 0
    rate: int = 0  # requests/s in all, shared by the connections; 0: as fast as answers come (not wrk)
    host: str = ""  # a Host header other than the URL's (a server that routes by name, like localtunnel)
    timeout: float = 30.0  # seconds a request may take before it counts as an error


@dataclass
class LoadResult:
    generator: str
    requests: int
    seconds: float
    bytes: int
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0

    def as_dict(self) -> dict:
        return dict(asdict(self), rps=round(self.rps, 1), mb_per_s=round(self.mb_per_s, 2))


class Pacer:
    """Spaces the operations of any number of coroutines 1/rate seconds apart (rate 0: no spacing)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1 / rate if rate else 0.0
        self.next = time.monotonic()

    async def wait(self) -> None:
        if self.interval:
            self.next += self.interval
            delay = self.next - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


def pick_generator(wanted: str = "auto") -> str:
    """wrk if installed, else hey, else the built-in Python driver."""
    if wanted != "auto":
        if wanted != "python" and shutil.which(wanted) is None:
            raise SystemExit(f"bench: {wanted} is not installed; {INSTALL_HINT}")
        return wanted
    for tool in ("wrk", "hey"):
        if shutil.which(tool):
            return tool
    return "python"


def run_load(generator: str, spec: LoadSpec, workdir: Path) -> LoadResult:
    if generator == "wrk":
        if spec.rate:
            raise ValueError("wrk cannot hold a fixed rate: use hey or the python driver")
        return _run_wrk(spec, workdir)
    if generator == "hey":
        return _run_hey(spec, workdir)
    return asyncio.run(_run_python(spec))


def _body_file(workdir: Path, size: int) -> Path:
    path = workdir / f"body-{size}.bin"
    if not path.exists():
        path.write_bytes(b"x" * size)
    return path


def _run_wrk(spec: LoadSpec, workdir: Path) -> LoadResult:
    script = workdir / f"wrk-{spec.method}-{spec.body_size}-{spec.host}.lua"
    lines = [f'wrk.method = "{spec.method}"']
    if spec.host:
        lines.append(f'wrk.headers["Host"] = "{spec.host}"')
    if spec.body_size:
        lines += [f"wrk.body = string.rep('x', {spec.body_size})",
                  'wrk.headers["Content-Type"] = "application/octet-stream"']
    script.write_text("\n".join(lines) + "\n" + WRK_DONE)
    threads = max(1, min(2, spec.concurrency))
    cmd = ["wrk", f"-t{threads}", f"-c{spec.concurrency}", f"-d{max(1, round(spec.duration))}s",
           "--timeout", f"{spec.timeout:g}s", "-s", str(script), spec.url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=spec.duration + 60)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            r = json.loads(line.split(" ", 1)[1])
            return LoadResult("wrk", r["requests"], r["duration_us"] / 1e6, r["bytes"], r["errors"] + r["non2xx"],
                              r["p50_us"] / 1e3, r["p99_us"] / 1e3, r["max_us"] / 1e3)
    raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def _run_hey(spec: LoadSpec, workdir: Path) -> LoadResult:
    cmd = ["hey", "-z", f"{max(1, round(spec.duration))}s", "-c", str(spec.concurrency), "-m", spec.method,
           "-t", str(max(1, round(spec.timeout)))]
    if spec.rate:
        cmd += ["-q", str(max(1, spec.rate // spec.concurrency))]  # hey's rate is per connection
    if spec.body_size:
        cmd += ["-D", str(_body_file(workdir, spec.body_size)), "-T", "application/octet-stream"]
    if spec.host:
        cmd += ["-host", spec.host]
    out = subprocess.run(cmd + [spec.url], capture_output=True, text=True, timeout=spec.duration + 60)
    return parse_hey_summary(out.stdout, f"exit {out.returncode}: {out.stderr[-500:]}")


def parse_hey_summary(text: str, context: str = "") -> LoadResult:
    """hey's text report. (Its CSV has a row for every answer but none for a request that failed
    or timed out, so errors would go uncounted; the report counts them, at 0.1 ms resolution.)"""
    def number(pattern: str, default: float | None = None) -> float:
        m = re.search(pattern, text, re.MULTILINE)
        if m is None:
            if default is None:
                raise RuntimeError(f"hey gave no result ({context}): {text[-500:]}")
            return default
        return float(m.group(1))

    seconds = number(r"^\s*Total:\s+([\d.]+) secs")
    statuses = {int(c): int(n) for c, n in re.findall(r"^\s+\[(\d+)\]\s+(\d+) responses", text, re.MULTILINE)}
    failures = 0
    if "Error distribution:" in text:
        failures = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s", text.split("Error distribution:", 1)[1],
                                                    re.MULTILINE))
    answered = sum(statuses.values())
    errors = failures + sum(n for code, n in statuses.items() if not 200 <= code < 300)
    ms = {q: number(rf"^\s+{q}% in ([\d.]+) secs", 0.0) * 1e3 for q in (50, 99)}
    return LoadResult("hey", answered + failures, seconds, int(number(r"Total data:\s+(\d+) bytes", 0.0)), errors,
                      ms[50], ms[99], number(r"Slowest:\s+([\d.]+) secs", 0.0) * 1e3)


async def _run_python(spec: LoadSpec) -> LoadResult:
    import aiohttp

    body = b"x" * spec.body_size if spec.body_size else None
    headers = {"Host": spec.host} if spec.host else None
    latencies: list[float] = []
    counts = {"bytes": 0, "errors": 0}
    conn = aiohttp.TCPConnector(limit=spec.concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=spec.timeout)) as session:
        started = time.monotonic()
        stop_at = started + spec.duration

        pacer = Pacer(spec.rate)

        async def worker() -> None:
            while time.monotonic() < stop_at:
                await pacer.wait()
                t0 = time.monotonic()
                try:
                    async with session.request(spec.method, spec.url, data=body, headers=headers) as r:
                        async for chunk in r.content.iter_any():
                            counts["bytes"] += len(chunk)
                        if r.status >= 400:
                            counts["errors"] += 1
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    counts["errors"] += 1
                latencies.append((time.monotonic() - t0) * 1e3)

        await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
        seconds = time.monotonic() - started
    latencies.sort()
    return LoadResult("python", len(latencies), seconds, counts["bytes"], counts["errors"],
                      _percentile(latencies, 50), _percentile(latencies, 99), latencies[-1] if latencies else 0.0)
