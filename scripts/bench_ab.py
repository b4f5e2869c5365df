#!/usr/bin/env python3
"""Compare two versions of the gateway and client on this machine, where two
runs of the same code one after the other can differ by 10-30 %.

Two modes:

* `together` (default): both versions run at once under the same fixed-rate
  load, so they share whatever the machine is doing at that moment; the CPU
  a request of each gateway and client, round by round, and the ratio B/A
  (steady to a few per cent). Whether a change made a request cheaper.
* `alternate`: each version in turn under full load (wrk, else hey, else a
  built-in driver; concurrency 64 by default), a fresh stack each round;
  requests/s and CPU a request. Whether a change made the tunnel faster.

    scripts/bench_ab.py HEAD~1                # HEAD~1 against the working tree
    scripts/bench_ab.py main my-branch --rounds 8 --json ab.json
    scripts/bench_ab.py HEAD~3 --mode alternate --rounds 4

A version is a git revision (checked out in a temporary worktree, removed at
the end) or a directory holding a checkout.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 30  # enough for several requests to share a gRPC message, as under real load


def checkout(version: str, where: Path) -> Path:
    """A directory holding `version`: itself when it is one, else a git worktree of that revision at `where`."""
    if Path(version).is_dir():
        return Path(version).resolve()
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where), version], check=True)
    return where


def load_stack_module(root: Path, name: str) -> ModuleType:
    """That version's own scripts/bench_stack.py: its stack starts that version's code."""
    spec = importlib.util.spec_from_file_location(name, root / "scripts" / "bench_stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def measure(stacks: list, urls: list[str], rate: int, seconds: float, generator: str, tmp: Path) -> list[dict]:
    """One round: the same load on every stack at once; CPU microseconds a request of each."""
    from bench_load import LoadSpec, run_load

    before = [(s.gateway.cpu_seconds(), s.client.cpu_seconds()) for s in stacks]
    answered = [0] * len(stacks)

    def drive(i: int) -> None:
        result = run_load(generator, LoadSpec(urls[i], CONCURRENCY, seconds, rate=rate), tmp)
        answered[i] = result.requests - result.errors

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(stacks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = []
    for (g0, c0), s, n in zip(before, stacks, answered):
        if n <= 0:
            raise SystemExit("bench_ab: a stack answered no request with 2xx; see its logs")
        rows.append({"requests": n, "gateway_us": (s.gateway.cpu_seconds() - g0) / n * 1e6,
                     "client_us": (s.client.cpu_seconds() - c0) / n * 1e6})
    return rows


def start_stack(stack: Any, cross_worker: bool) -> None:
    """Backend, gateway (one worker; or two, every request through the router) and a client of 2 connections."""
    stack.start_backend()
    if cross_worker:
        stack.start_gateway(2, force_cross_worker=True)
    else:
        stack.start_gateway(1)
    stack.start_client(2)


def measure_alternate(modules: list[ModuleType], tmp: Path, direction: str, path: str, concurrency: int,
                      seconds: float, generator: str, stacks: list, b_first: bool,
                      cross_worker: bool = False, post_bytes: int = 0) -> list[dict]:
    """One round of `alternate`: each version in turn, on a fresh stack, under full load. Rounds
    alternate which goes first: the second of a pair measured 5-10 % slower here, whichever it was."""
    from bench_load import LoadSpec, run_load
    from bench_stack import load_with_cpu

    rows: list[dict] = [{}, {}]
    for i in ((1, 0) if b_first else (0, 1)):
        module = modules[i]
        where = Path(tempfile.mkdtemp(dir=tmp))
        stack = module.BenchStack(where)
        stacks.append(stack)
        start_stack(stack, cross_worker)
        url = f"http://127.0.0.1:{stack.http_port if direction == 'ingress' else stack.local_port}{path}"
        method = "POST" if post_bytes else "GET"
        run_load(generator, LoadSpec(url, concurrency, 2.0, method, post_bytes), where)  # warm-up
        result, cpu_us = load_with_cpu(generator, LoadSpec(url, concurrency, seconds, method, post_bytes), where,
                                       {"gateway": stack.gateway, "client": stack.client})
        stack.close()
        stacks.remove(stack)  # only once stopped: a stop that fails leaves it to cleanup()
        if result.errors or not result.requests:
            raise SystemExit(f"bench_ab: version {'AB'[i]}: {result.errors} errors in {result.requests} requests")
        rows[i] = {"requests": result.requests, "rps": result.rps, "p99_ms": result.p99_ms,
                   "gateway_us": cpu_us["gateway"], "client_us": cpu_us["client"]}
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="git revision or checkout directory (A)")
    p.add_argument("candidate", nargs="?", default=str(ROOT), help="the same for B (default: this working tree)")
    p.add_argument("--mode", choices=("together", "alternate"), default="together")
    p.add_argument("--direction", choices=("ingress", "egress"), default="ingress")
    p.add_argument("--path", default="/bytes/100", help="what to request from the bench backend")
    p.add_argument("--post-bytes", type=int, default=0,
                   help="alternate: POST a body of this many bytes to --path (e.g. /sink) instead of a GET")
    p.add_argument("--cross-worker", action="store_true",
                   help="two gateway workers, every request through the router (force_cross_worker)")
    p.add_argument("--rate", type=int, default=0,
                   help="together: requests/s on each stack (default 1500 with hey, 300 without)")
    p.add_argument("--concurrency", type=int, default=64, help="alternate: connections of the load generator")
    p.add_argument("--rounds", type=int, default=6, help="measured rounds, after one to warm up")
    p.add_argument("--seconds", type=float, default=4.0, help="length of a round")
    p.add_argument("--generator", choices=("auto", "wrk", "hey", "python"), default="auto",
                   help="together: hey or python; alternate: wrk, hey or python (auto: the first installed)")
    p.add_argument("--json", type=Path, help="write the results here too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "alternate" and args.rounds % 2:
        raise SystemExit("bench_ab: --mode alternate takes an even --rounds (each version goes first as often)")
    if args.post_bytes and args.mode != "alternate":
        raise SystemExit("bench_ab: --post-bytes is for --mode alternate")
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_load import pick_generator

    if args.mode == "together" and args.generator == "wrk":
        raise SystemExit("bench_ab: --mode together needs a fixed rate: hey or python")
    if args.mode == "together" and args.generator == "auto":
        generator = "hey" if shutil.which("hey") else "python"
    else:
        generator = pick_generator(args.generator)
    rate = args.rate or (1500 if generator == "hey" else 300)
    tmp = Path(tempfile.mkdtemp(prefix="bench_ab-"))
    roots: list[Path] = []
    stacks: list = []
    try:
        for i, version in enumerate((args.base, args.candidate)):
            roots.append(checkout(version, tmp / f"version-{'ab'[i]}"))
        modules = [load_stack_module(root, f"bench_stack_{i}") for i, root in enumerate(roots)]
        # One record of the ports handed out, or the two stacks could get the same one.
        modules[1]._handed_out = modules[0]._handed_out
        if args.mode == "alternate":
            rounds = [measure_alternate(modules, tmp, args.direction, args.path, args.concurrency, args.seconds,
                                        generator, stacks, b_first=n % 2 == 1, cross_worker=args.cross_worker,
                                        post_bytes=args.post_bytes)
                      for n in range(args.rounds)]
        else:
            for i, module in enumerate(modules):
                (tmp / f"stack{i}").mkdir()
                stack = module.BenchStack(tmp / f"stack{i}")
                stacks.append(stack)
                start_stack(stack, args.cross_worker)
            port = "http_port" if args.direction == "ingress" else "local_port"
            urls = [f"http://127.0.0.1:{getattr(s, port)}{args.path}" for s in stacks]
            measure(stacks, urls, rate, min(args.seconds, 2.0), generator, tmp)  # warm-up
            rounds = [measure(stacks, urls, rate, args.seconds, generator, tmp) for _ in range(args.rounds)]
    finally:
        cleanup(stacks, roots, tmp)
    report = summarise(args, rate, generator, rounds)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def cleanup(stacks: list, roots: list[Path], tmp: Path) -> None:
    """Stop every process and remove the worktrees, whatever fails on the way."""
    for stack in stacks:
        try:
            stack.close()
        except BaseException as exc:  # one stuck stack must not leave the other running
            print(f"bench_ab: stopping a stack: {exc!r}", file=sys.stderr)
    for root in roots:
        if tmp in root.parents:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(root)], check=False)
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)


def summarise(args: argparse.Namespace, rate: int, generator: str, rounds: list[list[dict]]) -> dict:
    out = {"base": args.base, "candidate": args.candidate, "mode": args.mode, "direction": args.direction,
           "path": args.path, "generator": generator, "cross_worker": args.cross_worker,
           "post_bytes": args.post_bytes, "rounds": rounds, "median": {}, "ratio": {}}
    if args.mode == "alternate":
        out["concurrency"] = args.concurrency
    else:
        out["rate_per_stack"] = rate
    for side in ("rps", "gateway_us", "client_us"):
        if side not in rounds[0][0]:
            continue
        out["median"][side] = [round(statistics.median(r[i][side] for r in rounds), 1) for i in (0, 1)]
        per_round = [r[1][side] / r[0][side] for r in rounds]
        out["ratio"][side] = {"per_round": [round(x, 3) for x in per_round],
                              "median": round(statistics.median(per_round), 3)}
    return out


def print_report(report: dict) -> None:
    load = (f"concurrency {report['concurrency']}, one version after the other" if report["mode"] == "alternate"
            else f"{report['rate_per_stack']} req/s on each stack, both at once")
    where = ", two workers, every request through the router" if report.get("cross_worker") else ""
    if report.get("post_bytes"):
        where = f" (POST of {report['post_bytes']} bytes){where}"
    print(f"{report['direction']} {report['path']}{where}, {load} ({report['generator']}), "
          f"{len(report['rounds'])} rounds")
    print(f"{'':16s} {'A: ' + report['base']:>24s} {'B: ' + Path(report['candidate']).name:>24s}"
          f" {'B/A median':>11s}  B/A each round")
    for side, label in (("rps", "requests/s"), ("gateway_us", "gateway CPU (us)"), ("client_us", "client CPU (us)")):
        if side in report["median"]:
            a, b = report["median"][side]
            ratio = report["ratio"][side]
            print(f"{label:16s} {a:24.1f} {b:24.1f} {ratio['median']:11.3f}  {ratio['per_round']}")


if __name__ == "__main__":
    sys.exit(main())
