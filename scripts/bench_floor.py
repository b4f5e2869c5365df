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
  - entry: the entries' HTTP/1.1 server (gateway/http/entry_server.py)
    answering 100 bytes (the HTTP side of the gateway's public entry, with
    nothing behind it);
  - upstream: the client's pooled HTTP/1.1 client calling the backend (the
    HTTP side of the client);
  - gRPC: one message of the tunnel's average size through the tunnel's own
    transport on the tunnel's gRPC I/O engine, each way, writer and reader.

Each part runs twice: saturated (as fast as it goes: several events share a
wake-up, so a unit costs less than in the tunnel) and paced at the rate the
tunnel ran at (one event a wake-up, so a unit costs more than in the tunnel,
where work arrives in bursts). What the tunnel's own work costs lies between
the two figures.

The tunnel's own work (routes, limits, streams, exchanges, frames, metrics,
records) is what the gateway and the client spend beyond their parts alone:
gateway + client - (entry + upstream + gRPC messages a request x their cost).
The floor, direct + the parts, is what a request would cost if the tunnel did
nothing of its own. With perfect overlap the cores could do `cores / cost`
requests a second; the report gives that bound, the CPU a request that 40 %
of the direct rate would allow (with perfect overlap, and at the overlap
measured), and the room that leaves for the tunnel's own work.

    scripts/bench_floor.py                 # about a minute
    scripts/bench_floor.py --quick --json floor.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_load import INSTALL_HINT, LoadSpec, Pacer, pick_generator, run_load  # noqa: E402
from bench_stack import BenchStack, ProcGroup, free_port, get_json, load_with_cpu  # noqa: E402

CONCURRENCY = 64
SHARE = 0.40  # issue 6: the tunnel at 40 % of the direct rate
MODES = ("saturated", "paced")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- the parts alone, each run as `bench_floor.py --part ...` in a child ---------------

async def _serve_entry(port: int) -> None:
    """The entries' server (as the gateway's entry uses it) answering 100 bytes."""
    from aiohttp import web

    from gateway.http.connections import EntryLimits
    from gateway.http.entry import entry_server

    body = b"x" * 100

    async def handler(_request: web.BaseRequest) -> web.Response:
        return web.Response(body=body)

    await entry_server(handler, 8192, EntryLimits()).listen("127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _call_upstream(url: str, seconds: float, concurrency: int, rate: float) -> dict:
    """The client's HTTP side alone: pooled GETs of 100 bytes from the backend, `rate` a second (0: flat out)."""
    from gateway.http.upstream_pool import HttpPool

    pool = HttpPool()
    calls = errors = 0
    stop = 0.0
    pacer = Pacer(rate)

    async def one_by_one() -> None:
        nonlocal calls, errors
        while time.monotonic() < stop:
            await pacer.wait()
            resp = await pool.request(url, "GET", "/bytes/100", [], None, read_timeout=10)
            try:
                while await resp.read() is not None:
                    pass
            finally:
                resp.release()
            calls += 1
            errors += resp.status != 200

    for warm_up in (True, False):
        stop = time.monotonic() + (0.5 if warm_up else seconds)
        pacer.next = time.monotonic()
        calls, errors, cpu0 = 0, 0, _cpu()
        await asyncio.gather(*(one_by_one() for _ in range(concurrency)))
    cpu = _cpu() - cpu0
    await pool.close()
    return {"calls": calls, "errors": errors, "rate": rate, "cpu_us_per_call": round(cpu / max(calls, 1) * 1e6, 2)}


def _grpc_options(server: bool) -> list[tuple[str, int]]:
    from gateway.tunnel.transport import CLIENT_KEEPALIVE_MS, CLIENT_MAX_MESSAGE, grpc_options

    return grpc_options(CLIENT_MAX_MESSAGE, CLIENT_KEEPALIVE_MS, server=server)


async def _grpc_server(port: int, direction: str, count: int, size: int, rate: float) -> None:
    """The gateway's side of the tunnel transport: reads (`up`) or writes (`down`) `count` messages."""
    import grpc.aio

    from gateway.grpc_io import grpc_io_in_use
    from gateway.tunnel.transport import ServerTransport, tunnel_handler

    done = asyncio.Event()

    async def serve(t: ServerTransport) -> None:
        n, cpu0 = 0, _cpu()
        if direction == "up":
            await t.read()  # the call's set-up message: not a message's cost
            cpu0 = _cpu()
            while await t.read() is not None:
                n += 1
        else:
            await t.read()
            payload, pacer = b"x" * size, Pacer(rate)
            cpu0 = _cpu()
            for _ in range(count):
                await pacer.wait()
                await t.write(payload)
            n = count
        print(json.dumps({"messages": n, "cpu_us_per_message": round((_cpu() - cpu0) / max(n, 1) * 1e6, 2),
                          "grpc_io": grpc_io_in_use()}), flush=True)
        done.set()

    server = grpc.aio.server(options=_grpc_options(server=True))
    server.add_generic_rpc_handlers((tunnel_handler(serve),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await done.wait()
    await server.stop(1)


async def _grpc_client(port: int, direction: str, count: int, size: int, rate: float) -> dict:
    """The client's side: writes (`up`) or reads (`down`) `count` messages."""
    import grpc.aio

    from gateway.tunnel.transport import ClientTransport, open_client_call

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=_grpc_options(server=False))
    call = open_client_call(channel)
    t = ClientTransport(call, "bench")
    n = 0
    if direction == "up":
        payload, pacer = b"x" * size, Pacer(rate)
        await t.write(payload)  # the call's set-up
        cpu0 = _cpu()
        for _ in range(count):
            await pacer.wait()
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
    """Run one part in this process (the parent measures it from outside or reads its JSON line)."""
    part, args = argv[0], argv[1:]
    if part.startswith("grpc"):
        # The tunnel's own engine (the gateway and the client choose it before grpc is imported).
        from gateway.grpc_io import choose_grpc_io

        choose_grpc_io(False)
    import uvloop

    if part == "entry":
        uvloop.run(_serve_entry(int(args[0])))
    elif part == "upstream":
        result = uvloop.run(_call_upstream(args[0], float(args[1]), int(args[2]), float(args[3])))
        print(json.dumps(result), flush=True)
    elif part == "grpc-server":
        uvloop.run(_grpc_server(int(args[0]), args[1], int(args[2]), int(args[3]), float(args[4])))
    elif part == "grpc-client":
        result = uvloop.run(_grpc_client(int(args[0]), args[1], int(args[2]), int(args[3]), float(args[4])))
        print(json.dumps(result), flush=True)
    else:
        raise SystemExit(f"bench_floor: unknown part {part!r}")
    return 0


# -- the measurements ---------------------------------------------------------------------

def _part_cmd(*args: object) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--part", *map(str, args)]


def _result_line(stdout: str, stderr: str = "") -> dict:
    """The JSON line a part printed last."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"bench_floor: a part gave no result: {stdout[-800:]} {stderr[-800:]}")


class Floor:
    """One run: the direct call and the tunnel under full load, then each part alone, saturated and paced."""

    def __init__(self, args: argparse.Namespace, stack: BenchStack, tmp: Path) -> None:
        self.args, self.stack, self.tmp = args, stack, tmp
        self.generator = pick_generator(args.generator)
        # A rate needs hey or the python driver (wrk cannot hold one).
        self.paced_generator = "hey" if shutil.which("hey") else "python"
        self.seconds = 2.0 if args.quick else args.duration

    def warm_up(self, url: str) -> None:
        run_load(self.generator, LoadSpec(url, CONCURRENCY, 1.0), self.tmp)

    def measure(self, url: str, groups: dict[str, ProcGroup], rate: float = 0) -> dict:
        """A load run on `url`: requests/s, CPU microseconds a request of the generator and of `groups`."""
        generator = self.paced_generator if rate else self.generator
        spec = LoadSpec(url, CONCURRENCY, self.seconds, rate=round(rate))
        result, cpu = load_with_cpu(generator, spec, self.tmp, groups)
        if result.errors or not result.requests:
            raise SystemExit(f"bench_floor: {result.errors} errors of {result.requests} requests on {url}")
        return {"generator": generator, "rate": round(rate), "rps": round(result.rps, 1), "requests": result.requests,
                "cpu_us": {k: round(v, 2) for k, v in cpu.items()}}

    def direct_and_tunnel(self) -> tuple[dict, dict]:
        s = self.stack
        direct_url = f"{s.backend_url}/bytes/100"
        self.warm_up(direct_url)
        direct = self.measure(direct_url, {"backend": s.backend})
        url = f"http://127.0.0.1:{s.http_port}/bytes/100"
        self.warm_up(url)
        before = self.tunnel_counters()
        tunnel = self.measure(url, {"backend": s.backend, "gateway": s.gateway, "client": s.client})
        after = self.tunnel_counters()
        if before["connections"] != after["connections"]:
            raise SystemExit("bench_floor: a tunnel connection was replaced during the run (its counters restarted)")
        tunnel["grpc"] = {}
        for way in ("down", "up"):
            batches = after[way][0] - before[way][0]
            tunnel["grpc"][way] = {
                "messages_per_request": round(batches / tunnel["requests"], 4),
                "bytes_per_message": round((after[way][1] - before[way][1]) / max(batches, 1)),
                "messages_per_s": round(batches / tunnel["requests"] * tunnel["rps"]),
            }
        return direct, tunnel

    def tunnel_counters(self) -> dict:
        """gRPC messages and bytes sent so far, down by the gateway and up by the client, and which
        connections sent them. One worker: /admin/clients lists its own live streams (with more, other
        workers' rows would be their last announce)."""
        clients = get_json(f"{self.stack.admin_url}/admin/clients")["clients"]
        status = get_json(f"http://127.0.0.1:{self.stack.client_admin_port}/status")
        return {"down": (sum(c["batches_out"] for c in clients), sum(c["bytes_out"] for c in clients)),
                "up": (status["batches_out"], status["bytes_out"]),
                "connections": (sorted((c["connection"], c["connected_at"]) for c in clients), status["connects"])}

    def entry_alone(self, rate: float) -> dict[str, dict]:
        port = free_port()
        group = self.stack.start_process("entry-alone", _part_cmd("entry", port))
        try:
            self.stack.wait_ready("entry alone", group, lambda: "ready" in group.log.read_text())
            url = f"http://127.0.0.1:{port}/"
            self.warm_up(url)
            return {"saturated": self.measure(url, {"entry": group}),
                    "paced": self.measure(url, {"entry": group}, rate)}
        finally:
            group.stop()

    def upstream_alone(self, rate: float) -> dict:
        cmd = _part_cmd("upstream", self.stack.backend_url, self.seconds, CONCURRENCY, rate)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=self.seconds + 60, cwd=ROOT)
        result = _result_line(out.stdout, out.stderr)
        if result["errors"] or not result["calls"]:
            raise SystemExit(f"bench_floor: the upstream part: {result}")
        return result

    def grpc_alone(self, way: str, size: int, rate: float) -> dict:
        """Writer and reader CPU a message `way` (down: gateway -> client; up: client -> gateway)."""
        if rate:
            count = max(200, round(rate * self.seconds))
        else:
            count = 2000 if self.args.quick else 20000
        port = free_port()
        server = self.stack.start_process(f"grpc-{way}", _part_cmd("grpc-server", port, way, count, size, rate))
        try:
            self.stack.wait_ready(f"gRPC server ({way})", server, lambda: "ready" in server.log.read_text())
            out = subprocess.run(_part_cmd("grpc-client", port, way, count, size, rate), capture_output=True,
                                 text=True, timeout=count / (rate or 1000) + 120, cwd=ROOT)
            client = _result_line(out.stdout, out.stderr)
            server.popen.wait(30)  # it prints its figure when the call ends, then exits
            gateway = _result_line(server.log.read_text())
        finally:
            server.stop()
        writer, reader = (gateway, client) if way == "down" else (client, gateway)
        if writer["messages"] != count or reader["messages"] != count:
            raise SystemExit(f"bench_floor: gRPC {way}: {count} messages sent, writer {writer}, reader {reader}")
        return {"size": size, "messages": count, "rate": round(rate), "grpc_io": gateway["grpc_io"],
                "writer_us": writer["cpu_us_per_message"], "reader_us": reader["cpu_us_per_message"]}

    def parts(self, tunnel: dict) -> dict[str, dict]:
        """Each part alone, saturated and at the tunnel's rate."""
        rate = tunnel["rps"]
        entry = self.entry_alone(rate)
        out = {}
        for mode in MODES:
            paced = mode == "paced"
            out[mode] = {
                "entry": entry[mode],
                "upstream": self.upstream_alone(rate if paced else 0),
                "grpc": {way: self.grpc_alone(way, max(64, seen["bytes_per_message"]),
                                              seen["messages_per_s"] if paced else 0)
                         for way, seen in tunnel["grpc"].items()},
            }
        return out


def summarise(direct: dict, tunnel: dict, parts: dict[str, dict], cores: int) -> dict:
    """The arithmetic of the report, from the measurements (microseconds of CPU a request)."""
    cpu = tunnel["cpu_us"]
    direct_us = sum(direct["cpu_us"].values())
    around_us = cpu["backend"] + cpu["load generator"]  # the same two processes, with the tunnel in front
    gateway_client_us = cpu["gateway"] + cpu["client"]
    tunnel_us = around_us + gateway_client_us
    overlap = tunnel["rps"] * tunnel_us / 1e6  # cores busy on average with this work
    wanted_rps = SHARE * direct["rps"]
    budget_at_overlap = overlap / wanted_rps * 1e6
    by_mode = {}
    for mode, p in parts.items():
        shares = {
            "entry alone": p["entry"]["cpu_us"]["entry"],
            "upstream call alone": p["upstream"]["cpu_us_per_call"],
            "gRPC: messages a request x cost alone": sum(
                tunnel["grpc"][w]["messages_per_request"] * (g["writer_us"] + g["reader_us"])
                for w, g in p["grpc"].items()),
        }
        total = sum(shares.values())
        by_mode[mode] = {
            "parts_us": {k: round(v, 1) for k, v in shares.items()},
            "parts_total_us": round(total, 1),
            "own_work_us": round(gateway_client_us - total, 1),
            "floor_us": round(direct_us + total, 1),
            "floor_bound_rps": round(cores / (direct_us + total) * 1e6),
            # What 40 % of direct leaves the tunnel's own work, at the overlap measured.
            "own_work_room_us": round(budget_at_overlap - around_us - total, 1),
        }
    return {
        "cores": cores,
        "direct_us": round(direct_us, 1),
        "around_us": round(around_us, 1),
        "gateway_client_us": round(gateway_client_us, 1),
        "tunnel_us": round(tunnel_us, 1),
        "overlap": round(overlap, 2),
        "tunnel_bound_rps": round(cores / tunnel_us * 1e6),
        "share": SHARE,
        "share_rps": round(wanted_rps),
        "share_budget_us": round(cores / wanted_rps * 1e6, 1),
        "share_budget_at_overlap_us": round(budget_at_overlap, 1),
        "by_mode": by_mode,
    }


def print_report(report: dict) -> None:
    d, t, parts, s = report["direct"], report["tunnel"], report["parts"], report["summary"]
    sat, paced = parts["saturated"], parts["paced"]
    print(f"{'run (c' + str(CONCURRENCY) + ', 100 B GET)':<40} {'req/s':>9}  CPU us a request, by process")
    for name, run in (("direct", d), ("tunnel (ingress)", t)):
        by_process = ", ".join(f"{k} {v:.1f}" for k, v in run["cpu_us"].items())
        print(f"{name:<40} {run['rps']:>9.0f}  {sum(run['cpu_us'].values()):6.1f} = {by_process}")
    for way, g in t["grpc"].items():
        print(f"  gRPC {way:<5} {g['messages_per_request']:.3f} messages a request ({g['messages_per_s']}/s), "
              f"{g['bytes_per_message']} bytes each")
    print()
    print(f"{'part alone, CPU us':<40} {'saturated':>9} {'paced':>9}")
    print(f"{'entry (its server, 100 B), a request':<40} {sat['entry']['cpu_us']['entry']:>9.1f} "
          f"{paced['entry']['cpu_us']['entry']:>9.1f}")
    print(f"{'upstream call (HttpPool -> backend)':<40} {sat['upstream']['cpu_us_per_call']:>9.1f} "
          f"{paced['upstream']['cpu_us_per_call']:>9.1f}")
    for way in sat["grpc"]:
        a, b = sat["grpc"][way], paced["grpc"][way]
        label = f"gRPC message {way}, {a['size']} B"
        print(f"{label + ', writer':<40} {a['writer_us']:>9.1f} {b['writer_us']:>9.1f}")
        print(f"{label + ', reader':<40} {a['reader_us']:>9.1f} {b['reader_us']:>9.1f}")
    print()
    print(f"{'a request through the tunnel, CPU us':<40} {'saturated':>9} {'paced':>9}")
    print(f"{'generator + backend':<40} {s['around_us']:>9.1f}  ({s['direct_us']} in the direct call)")
    print(f"{'gateway + client':<40} {s['gateway_client_us']:>9.1f}")
    a, b = s["by_mode"]["saturated"], s["by_mode"]["paced"]
    for name in a["parts_us"]:
        print(f"  {name:<38} {a['parts_us'][name]:>9.1f} {b['parts_us'][name]:>9.1f}")
    print(f"  {'the tunnel' + chr(39) + 's own work (the rest)':<38} {a['own_work_us']:>9.1f} {b['own_work_us']:>9.1f}")
    print(f"{'floor (direct call + the parts)':<40} {a['floor_us']:>9.1f} {b['floor_us']:>9.1f}")
    print(f"{'all four processes, measured':<40} {s['tunnel_us']:>9.1f}")
    print()
    print(f"on {s['cores']} cores with perfect overlap, the four processes' work allows {s['tunnel_bound_rps']} req/s "
          f"and the floor {b['floor_bound_rps']}-{a['floor_bound_rps']} (measured: {t['rps']:.0f} req/s, "
          f"{s['overlap']} cores busy on average)")
    print(f"{s['share']:.0%} of the direct rate is {s['share_rps']} req/s: {s['share_budget_us']} us of CPU a request "
          f"with perfect overlap, {s['share_budget_at_overlap_us']} at the overlap measured; that leaves the "
          f"tunnel's own work {b['own_work_room_us']} to {a['own_work_room_us']} us")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 s load runs and fewer gRPC messages (about 30 s)")
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
            if floor.generator == "python":
                print(f"bench_floor: the built-in Python load generator shares the cores; {INSTALL_HINT}",
                      file=sys.stderr)
            stack.start_backend()
            stack.start_gateway(1)
            stack.start_client(args.connections)
            direct, tunnel = floor.direct_and_tunnel()
            stack.stop_tunnel()  # the parts alone run on a machine as quiet as the direct call's
            parts = floor.parts(tunnel)
        finally:
            stack.close()
    report = {"meta": {"generator": floor.generator, "paced_generator": floor.paced_generator,
                       "seconds": floor.seconds, "concurrency": CONCURRENCY, "connections": args.connections},
              "direct": direct, "tunnel": tunnel, "parts": parts,
              "summary": summarise(direct, tunnel, parts, len(os.sched_getaffinity(0)))}
    print_report(report)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
