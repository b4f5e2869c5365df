#!/usr/bin/env python3
"""What a request through the tunnel costs, part by part: the tunnel under
full load beside each part it is made of, measured alone, in one run.

A request through the tunnel (ingress) is a direct call (load generator,
backend) plus the work of two more processes. Part of that work no tunnel
built on the same libraries can avoid; the rest is the tunnel's own. This
script measures, as CPU microseconds of the process doing it:

* direct: the load generator and the backend, per request (wrk -> backend);
* tunnel: the same, plus the gateway and the client, per request (wrk ->
  gateway -> client -> backend), and how many gRPC messages a request takes
  each way and how big they are;
* the parts alone, each in a process of its own:
  - entry: aiohttp's low-level server answering 100 bytes (the HTTP side of
    the gateway's public entry, with nothing behind it);
  - upstream: the client's pooled HTTP/1.1 client calling the backend (the
    HTTP side of the client);
  - gRPC: one message of the tunnel's average size through the tunnel's own
    transport, each way, writer and reader.

The tunnel's own work (routes, limits, streams, exchanges, frames, metrics,
records) is what the gateway and the client spend beyond their parts alone:
gateway + client - (entry + upstream + gRPC messages a request x their cost).
The floor, direct + the parts, is what a request would cost if the tunnel did
nothing of its own. With perfect overlap the cores could do `cores / cost`
requests a second; the report gives that bound for the tunnel and for the
floor, and the CPU a request that 40 % of the direct rate would allow.

    scripts/bench_floor.py                 # about 40 s
    scripts/bench_floor.py --quick --json floor.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_load import LoadSpec, pick_generator, run_load  # noqa: E402
from bench_stack import BenchStack, ProcGroup, _get_json, free_port  # noqa: E402

CONCURRENCY = 64
SHARE = 0.40  # issue 6: the tunnel at 40 % of the direct rate


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- the parts alone, each run as `bench_floor.py --part ...` in a child ---------------

async def _serve_entry(port: int) -> None:
    """aiohttp's low-level server (as the gateway's entry uses it) answering 100 bytes."""
    from aiohttp import web

    body = b"x" * 100

    async def handler(_request: web.BaseRequest) -> web.Response:
        return web.Response(body=body)

    runner = web.ServerRunner(web.Server(handler, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _call_upstream(url: str, seconds: float, concurrency: int) -> dict:
    """The client's HTTP side alone: pooled GETs of 100 bytes from the backend."""
    from gateway.tunnel.upstream_http import HttpPool

    pool = HttpPool()
    calls = 0
    stop = 0.0

    async def one_by_one() -> None:
        nonlocal calls
        while time.monotonic() < stop:
            resp = await pool.request(url, "GET", "/bytes/100", [], None, read_timeout=10)
            try:
                while await resp.read() is not None:
                    pass
            finally:
                resp.release()
            calls += 1

    for warm_up in (True, False):
        stop = time.monotonic() + (0.5 if warm_up else seconds)
        calls, cpu0 = 0, _cpu()
        await asyncio.gather(*(one_by_one() for _ in range(concurrency)))
    cpu = _cpu() - cpu0
    await pool.close()
    return {"calls": calls, "cpu_us_per_call": round(cpu / max(calls, 1) * 1e6, 2)}


async def _grpc_server(port: int, direction: str, count: int, size: int) -> None:
    """The gateway's side of the tunnel transport: reads (`up`) or writes (`down`) `count` messages."""
    import grpc.aio

    from gateway.tunnel.transport import ServerTransport, grpc_options, tunnel_handler

    done = asyncio.Event()

    async def serve(t: ServerTransport) -> None:
        n, cpu0 = 0, 0.0
        if direction == "up":
            while (msg := await t.read()) is not None:
                if n == 0:
                    cpu0 = _cpu()  # from the first message: the call's set-up is not a message's cost
                n += 1
            n -= 1
        else:
            await t.read()
            payload = b"x" * size
            cpu0 = _cpu()
            for _ in range(count):
                await t.write(payload)
            n = count
        print(json.dumps({"messages": n, "cpu_us_per_message": round((_cpu() - cpu0) / max(n, 1) * 1e6, 2)}),
              flush=True)
        done.set()

    server = grpc.aio.server(options=grpc_options(16 << 20, 10000, server=True))
    server.add_generic_rpc_handlers((tunnel_handler(serve),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await done.wait()
    await server.stop(1)


async def _grpc_client(port: int, direction: str, count: int, size: int) -> dict:
    """The client's side: writes (`up`) or reads (`down`) `count` messages."""
    import grpc.aio

    from gateway.tunnel.transport import ClientTransport, grpc_options, open_client_call

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(16 << 20, 10000, server=False))
    call = open_client_call(channel)
    t = ClientTransport(call, "bench")
    n = 0
    if direction == "up":
        payload = b"x" * size
        await t.write(payload)  # the call's set-up
        cpu0 = _cpu()
        for _ in range(count):
            await t.write(payload)
        n = count
        cpu = _cpu() - cpu0
        await call.done_writing()
        await asyncio.wait_for(call.code(), 30)
    else:
        await t.write(b"go")
        cpu0 = _cpu()
        while n < count and await t.read() is not None:
            n += 1
        cpu = _cpu() - cpu0
    await channel.close()
    return {"messages": n, "cpu_us_per_message": round(cpu / max(n, 1) * 1e6, 2)}


def run_part(argv: list[str]) -> int:
    import uvloop

    part, args = argv[0], argv[1:]
    if part == "entry":
        uvloop.run(_serve_entry(int(args[0])))
    elif part == "upstream":
        print(json.dumps(uvloop.run(_call_upstream(args[0], float(args[1]), int(args[2])))), flush=True)
    elif part == "grpc-server":
        uvloop.run(_grpc_server(int(args[0]), args[1], int(args[2]), int(args[3])))
    elif part == "grpc-client":
        print(json.dumps(uvloop.run(_grpc_client(int(args[0]), args[1], int(args[2]), int(args[3])))), flush=True)
    else:
        raise SystemExit(f"bench_floor: unknown part {part!r}")
    return 0


# -- the measurements ---------------------------------------------------------------------

def _part_cmd(*args: object) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--part", *map(str, args)]


def _last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"bench_floor: a part gave no result: {text[-800:]}")


class Floor:
    def __init__(self, args: argparse.Namespace, stack: BenchStack, tmp: Path) -> None:
        self.args, self.stack, self.tmp = args, stack, tmp
        self.generator = pick_generator(args.generator)
        self.seconds = 2.0 if args.quick else args.duration

    def load(self, url: str, procs: dict[str, ProcGroup]) -> dict:
        """Full load on `url`: requests/s and CPU microseconds a request of the generator and of `procs`."""
        spec = LoadSpec(url, CONCURRENCY, self.seconds)
        run_load(self.generator, LoadSpec(url, CONCURRENCY, 1.0), self.tmp)  # warm-up
        before = {k: g.cpu_seconds() for k, g in procs.items()}
        # wrk and hey are children of this process; the python driver runs in it.
        who = resource.RUSAGE_SELF if self.generator == "python" else resource.RUSAGE_CHILDREN
        r0 = resource.getrusage(who)
        result = run_load(self.generator, spec, self.tmp)
        r1 = resource.getrusage(who)
        if result.errors or not result.requests:
            raise SystemExit(f"bench_floor: {result.errors} errors of {result.requests} requests on {url}")
        n = result.requests
        cpu = {k: (g.cpu_seconds() - before[k]) / n * 1e6 for k, g in procs.items()}
        cpu["load generator"] = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / n * 1e6
        return {"rps": round(result.rps, 1), "requests": n, "cpu_us": {k: round(v, 2) for k, v in cpu.items()}}

    def direct_and_tunnel(self) -> tuple[dict, dict]:
        s = self.stack
        backend = s.groups[0]
        direct = self.load(f"{s.backend_url}/bytes/100", {"backend": backend})
        url = f"http://127.0.0.1:{s.http_port}/bytes/100"
        before = self.messages()
        tunnel = self.load(url, {"backend": backend, "gateway": s.gateway, "client": s.client})
        after = self.messages()
        n = tunnel["requests"]
        tunnel["grpc"] = {}
        for way in ("down", "up"):
            batches = after[way][0] - before[way][0]
            tunnel["grpc"][way] = {
                "messages_per_request": round(batches / n, 4),
                "bytes_per_message": round((after[way][1] - before[way][1]) / max(batches, 1)),
            }
        return direct, tunnel

    def messages(self) -> dict[str, tuple[int, int]]:
        """(gRPC messages, bytes) sent so far: down by the gateway, up by the client."""
        clients = _get_json(f"{self.stack.admin_url}/admin/clients")["clients"]
        status = _get_json(f"http://127.0.0.1:{self.stack.client_admin_port}/status")
        return {"down": (sum(c["batches_out"] for c in clients), sum(c["bytes_out"] for c in clients)),
                "up": (status["batches_out"], status["bytes_out"])}

    def entry_alone(self) -> dict:
        port = free_port()
        group = self.stack._start("entry-alone", _part_cmd("entry", port))
        self.stack._wait("entry alone", group, lambda: "ready" in group.log.read_text())
        try:
            return self.load(f"http://127.0.0.1:{port}/", {"entry": group})
        finally:
            group.stop()

    def upstream_alone(self) -> dict:
        out = subprocess.run(_part_cmd("upstream", self.stack.backend_url, self.seconds, CONCURRENCY),
                             capture_output=True, text=True, timeout=self.seconds + 60, cwd=ROOT)
        return _last_json(out.stdout + out.stderr)

    def grpc_alone(self, way: str, size: int) -> dict:
        """Writer and reader CPU a message `way` (down: gateway -> client; up: client -> gateway)."""
        count = 2000 if self.args.quick else 20000
        port = free_port()
        server = self.stack._start(f"grpc-{way}", _part_cmd("grpc-server", port, way, count, size))
        try:
            self.stack._wait(f"gRPC server ({way})", server, lambda: "ready" in server.log.read_text())
            out = subprocess.run(_part_cmd("grpc-client", port, way, count, size), capture_output=True, text=True,
                                 timeout=120, cwd=ROOT)
            client = _last_json(out.stdout + out.stderr)
            deadline = time.monotonic() + 30
            while "messages" not in server.log.read_text() and time.monotonic() < deadline and server.alive():
                time.sleep(0.05)
            gateway = _last_json(server.log.read_text())
        finally:
            server.stop()
        writer, reader = (gateway, client) if way == "down" else (client, gateway)
        return {"size": size, "messages": count, "writer_us": writer["cpu_us_per_message"],
                "reader_us": reader["cpu_us_per_message"]}


def summarise(direct: dict, tunnel: dict, entry: dict, upstream: dict, grpc: dict[str, dict]) -> dict:
    cores = os.cpu_count() or 1
    cpu = tunnel["cpu_us"]
    direct_us = sum(direct["cpu_us"].values())
    around_us = cpu["backend"] + cpu["load generator"]  # the same two processes, with the tunnel in front
    tunnel_procs_us = cpu["gateway"] + cpu["client"]
    parts = {
        "entry alone": entry["cpu_us"]["entry"],
        "upstream call alone": upstream["cpu_us_per_call"],
        "gRPC: messages a request x cost alone": sum(
            tunnel["grpc"][w]["messages_per_request"] * (g["writer_us"] + g["reader_us"]) for w, g in grpc.items()),
    }
    parts_us = sum(parts.values())
    floor_us = direct_us + parts_us
    tunnel_us = around_us + tunnel_procs_us
    wanted_rps = SHARE * direct["rps"]
    return {
        "cores": cores,
        "direct_us": round(direct_us, 1),
        "around_us": round(around_us, 1),
        "gateway_client_us": round(tunnel_procs_us, 1),
        "parts_us": {k: round(v, 1) for k, v in parts.items()},
        "parts_total_us": round(parts_us, 1),
        "own_work_us": round(tunnel_procs_us - parts_us, 1),
        "floor_us": round(floor_us, 1),
        "tunnel_us": round(tunnel_us, 1),
        "overlap": round(tunnel["rps"] * tunnel_us / 1e6, 2),  # cores busy on average with this work
        "bound_rps": {"tunnel": round(cores / tunnel_us * 1e6), "floor": round(cores / floor_us * 1e6)},
        "share": SHARE,
        "share_rps": round(wanted_rps),
        "share_budget_us": round(cores / wanted_rps * 1e6, 1),  # CPU a request that rate allows, perfect overlap
    }


def print_report(report: dict) -> None:
    d, t, s = report["direct"], report["tunnel"], report["summary"]
    print(f"{'run (c' + str(CONCURRENCY) + ', 100 B GET)':<36} {'req/s':>9}  CPU us a request, by process")
    for name, run in (("direct", d), ("tunnel (ingress)", t)):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in run["cpu_us"].items())
        print(f"{name:<36} {run['rps']:>9.0f}  {sum(run['cpu_us'].values()):6.1f} = {parts}")
    for way, g in t["grpc"].items():
        print(f"  gRPC {way:<5} {g['messages_per_request']:.3f} messages a request, {g['bytes_per_message']} bytes each")
    print()
    print(f"{'part alone':<36} {'CPU us':>9}")
    print(f"{'entry (aiohttp server, 100 B)':<36} {report['entry']['cpu_us']['entry']:>9.1f}  a request "
          f"({report['entry']['rps']:.0f} req/s)")
    print(f"{'upstream call (HttpPool -> backend)':<36} {report['upstream']['cpu_us_per_call']:>9.1f}  a call")
    for way, g in report["grpc"].items():
        print(f"{'gRPC message ' + way + ', ' + str(g['size']) + ' B':<36} {g['writer_us']:>9.1f}  writer, "
              f"{g['reader_us']:.1f} reader")
    print()
    print(f"{'a request through the tunnel':<36} {'CPU us':>9}")
    print(f"{'generator + backend':<36} {s['around_us']:>9.1f}  ({s['direct_us']} in the direct call)")
    print(f"{'gateway + client':<36} {s['gateway_client_us']:>9.1f}")
    for name, v in s["parts_us"].items():
        print(f"  {name:<38} {v:>5.1f}")
    print(f"  {'the tunnel own work (the rest)':<38} {s['own_work_us']:>5.1f}")
    print(f"{'floor (direct call + the parts)':<36} {s['floor_us']:>9.1f}")
    print(f"{'tunnel, measured':<36} {s['tunnel_us']:>9.1f}")
    print()
    print(f"on {s['cores']} cores with perfect overlap: the tunnel's work allows {s['bound_rps']['tunnel']} req/s, "
          f"the floor {s['bound_rps']['floor']} req/s (measured: {t['rps']:.0f}, {s['overlap']} cores busy on average)")
    print(f"{s['share']:.0%} of the direct rate is {s['share_rps']} req/s: at most {s['share_budget_us']} us of CPU "
          f"a request, with perfect overlap")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="2 s load runs and fewer gRPC messages (about 25 s)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per load run (default 6)")
    p.add_argument("--connections", type=int, default=2, help="tunnel connections of the client (default 2)")
    p.add_argument("--generator", choices=("auto", "wrk", "hey", "python"), default="auto",
                   help="load generator (default: wrk, else hey, else built-in python)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-' for stdout)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--part"]:
        return run_part(argv[1:])
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tunnel-floor-") as tmpdir:
        stack = BenchStack(Path(tmpdir))
        try:
            floor = Floor(args, stack, Path(tmpdir))
            stack.start_backend()
            stack.start_gateway(1)
            stack.start_client(args.connections)
            direct, tunnel = floor.direct_and_tunnel()
            stack.stop_tunnel()  # the parts alone run on a machine as quiet as the direct call's
            entry = floor.entry_alone()
            upstream = floor.upstream_alone()
            grpc = {way: floor.grpc_alone(way, max(64, tunnel["grpc"][way]["bytes_per_message"]))
                    for way in ("down", "up")}
        finally:
            stack.close()
    report = {"meta": {"generator": floor.generator, "seconds": floor.seconds, "concurrency": CONCURRENCY,
                       "connections": args.connections},
              "direct": direct, "tunnel": tunnel, "entry": entry, "upstream": upstream, "grpc": grpc,
              "summary": summarise(direct, tunnel, entry, upstream, grpc)}
    print_report(report)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
