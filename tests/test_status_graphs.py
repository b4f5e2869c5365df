"""The status page's graphs: the per-worker history (buckets, merge, percentiles,
expiry), /admin/history on a real two-worker gateway, and the page in headless
Chromium with a screenshot that must hold a drawn chart."""
from __future__ import annotations

import struct
import subprocess
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import pytest

from gateway.history import BOUNDS, SPAN, WIDTH, History, merge, percentile, view
from gateway.workers.status_page import RPS_FILL, RPS_LINE, render_status_page
from tests.harness import TOKEN, Stack, get_json, http, wait_until
from tests.test_status_page import CHROMIUM


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _sum(rows: list, field: int) -> int:
    return sum(r[field] for r in rows)


# -- the history, pure ------------------------------------------------------------


def test_requests_of_one_bucket_add_up_and_the_next_bucket_is_apart():
    clock = Clock(1_700_000_000.0)  # a multiple of WIDTH: a bucket starts here
    h = History(clock)
    h.add("g1", 0.010, False)
    h.add("g1", 0.020, True)
    h.add("", 0.001, False)  # no group (no rule matched): the total only
    clock.t += WIDTH
    h.add("g2", 0.5, True)
    snap = h.snapshot()
    assert [r[:3] for r in snap["total"]] == [[340_000_000, 3, 1], [340_000_001, 1, 1]]
    assert [r[:3] for r in snap["groups"]["g1"]] == [[340_000_000, 2, 1]]
    assert [r[:3] for r in snap["groups"]["g2"]] == [[340_000_001, 1, 1]]
    assert h.snapshot("g2")["groups"].keys() == {"g2"}
    # Bins as (bin, count) pairs: the 10 ms and 20 ms samples in two bins.
    bins = snap["groups"]["g1"][0][3]
    assert len(bins) == 4 and sum(bins[1::2]) == 2


def test_merging_workers_is_exact():
    clock = Clock()
    one, a, b = History(clock), History(clock), History(clock)
    for i in range(500):
        clock.t += 0.7
        seconds = 0.0005 * (1.03 ** (i % 200))
        group, error = f"g{i % 3}", i % 11 == 0
        one.add(group, seconds, error)
        (a if i % 2 else b).add(group, seconds, error)
    assert merge([a.snapshot(), b.snapshot(), None]) == merge([one.snapshot()])
    # A snapshot of another layout (a worker of other code) is left out, not misread.
    odd = {**a.snapshot(), "bins": 7}
    assert merge([odd, b.snapshot()]) == merge([b.snapshot()])


def test_percentiles_are_within_a_bin_of_the_truth():
    clock = Clock()
    h = History(clock)
    samples = [0.002 * (1.01 ** i) for i in range(1000)]  # 2 ms .. ~42 ms
    for s in samples:
        h.add("g", s, False)
    hist = merge([h.snapshot()])["total"]
    (acc,) = hist.values()
    for q in (0.5, 0.99):
        true = sorted(samples)[int(q * len(samples)) - 1]
        got = percentile(acc[2], q)
        assert abs(got - true) / true < 0.2, (q, got, true)
    assert percentile({}, 0.5) is None
    assert percentile({len(BOUNDS): 3}, 0.99) == BOUNDS[-1]  # over the last bound: the last bound


def test_old_buckets_expire():
    clock = Clock()
    h = History(clock)
    h.add("old", 0.01, True)
    clock.t += SPAN - WIDTH
    assert _sum(h.snapshot()["total"], 1) == 1  # 14:55 later: still there
    clock.t += WIDTH
    h.add("new", 0.01, False)  # the same slot of the ring, 15 minutes on: cleared first
    snap = h.snapshot()
    assert _sum(snap["total"], 1) == 1 and _sum(snap["total"], 2) == 0
    assert "old" not in snap["groups"] and "old" not in h.groups  # a group gone quiet is forgotten
    clock.t += SPAN
    snap = h.snapshot()
    assert snap["total"] == [] and snap["groups"] == {} and not h.groups


def test_view_has_a_point_per_bucket_and_rates():
    clock = Clock(1_700_000_000.0 + 2)  # 2 s into the current bucket
    h = History(clock)
    for _ in range(10):
        h.add("g1", 0.004, False)
    for _ in range(10):
        h.add("g1", 0.004, True)
    v = view(merge([h.snapshot()]), None, ["g1", "idle"], now=clock.t)
    assert set(v["groups"]) == {"g1", "idle"} and v["group"] is None
    total = v["total"]
    assert len(total["t"]) == SPAN // WIDTH and total["t"][-1] == 1_700_000_000
    assert total["rps"][-1] == 10.0  # 20 requests in the 2 s the bucket has run
    assert total["error_rate"][-1] == 0.5
    assert 3.0 < total["p50_ms"][-1] < 4.5 and total["p50_ms"][0] is None
    assert sum(v["groups"]["idle"]["requests"]) == 0
    only = view(merge([h.snapshot("g1")]), "g1", ["g1", "idle"], now=clock.t)
    assert set(only["groups"]) == {"g1"}


def test_recording_does_not_grow_memory():
    h = History(Clock())
    h.add("g1", 0.01, False)  # the group's ring is made once
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(20_000):
            h.add("g1", 0.001 * (i % 50), i % 7 == 0)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 4096, grown


def test_page_draws_charts_and_counts_clients_apart_from_connections():
    clock = Clock()
    h = History(clock)
    for i in range(30):
        h.add("g1", 0.01, i % 5 == 0)
    stream = {"client_id": "c1", "connection": "c1/0", "group": "g1", "worker": 0, "remote": "x",
              "connected_at": 0, "config_version": "1", "pending": 0, "serving": 0, "draining": False}
    worker = {"worker": 0, "pid": 1, "uptime": 1.0, "streams": {"g1": 2}, "inflight": 0, "requests": 30,
              "cross_frames_in": 0, "cross_frames_out": 0,
              "clients": [stream, {**stream, "connection": "c1/1"}]}
    history = {**view(merge([h.snapshot()]), None, ["g1"], now=clock.t), "workers": {"unanswered": ["w1"]}}
    page = render_status_page([worker], {"g1": "1"}, None, None, history=history)
    assert 'id="clients-count">1<' in page and 'id="connections-count">2<' in page
    for chart in ("total-rps", "total-latency", "total-errors", "group-0-rps"):
        assert f'id="chart-{chart}"' in page
    assert f'fill="{RPS_FILL}"' in page and "<polygon" in page and "no history from w1" in page
    assert "http://" not in page.split("<body>", 1)[1]  # inline SVG, no namespace URL, no asset
    assert "Traffic" not in render_status_page([], {}, None, None)


# -- a real gateway ---------------------------------------------------------------

ROUTES = [
    {"path_prefix": "/", "headers": {"X-Group": "g2"}, "group": "g2", "timeout": 10.0},
    {"path_prefix": "/", "headers": {"X-Group": "g3"}, "group": "g3", "timeout": 10.0},
    {"path_prefix": "/hello", "group": "g1", "timeout": 10.0},
    {"path_prefix": "/slow", "group": "g1", "timeout": 10.0},
    {"path_prefix": "/status", "group": "g1", "timeout": 10.0},
]


def _three_groups(stack: Stack, doc: dict) -> None:
    web = {"web": {"servers": [stack.backend_url]}}
    rules = [{"path_prefix": "/", "upstream": "web"}]
    doc["groups"] = {g: {"tokens": [TOKEN], "upstreams": web, "rules": rules} for g in ("g1", "g2", "g3")}


@pytest.fixture(scope="module")
def busy(make_module_stack) -> Stack:
    """Two workers; g1 and g3 have a client, g2 none (its requests are 503s). Sent once:
    g1 20 x 200, 5 x upstream 500, 5 slow (80 ms); g2 6 x 503; g3 4 x 200; 3 x 404 (no group)."""
    stack = make_module_stack(settings={"workers": 2}, routes=ROUTES, edit=_three_groups)
    stack.start_client("c3", group="g3")
    sent = [("/hello", {}, 200)] * 20 + [("/status/500", {}, 500)] * 5 + [("/slow?ms=80", {}, 200)] * 5
    sent += [("/hello", {"X-Group": "g2"}, 503)] * 6 + [("/hello", {"X-Group": "g3"}, 200)] * 4
    sent += [("/nowhere", {}, 404)] * 3
    for path, headers, status in sent:
        assert http("GET", f"{stack.url}{path}", headers=headers).status == status, path
    return stack


def test_admin_history_adds_up_every_worker(busy):
    h = get_json(f"{busy.admin_url}/admin/history")
    assert h["workers"] == {"answered": ["w0", "w1"], "unanswered": []}
    assert h["width"] == WIDTH and h["span"] == SPAN and len(h["total"]["t"]) == SPAN // WIDTH
    assert (sum(h["total"]["requests"]), sum(h["total"]["errors"])) == (43, 11)
    counts = {g: (sum(s["requests"]), sum(s["errors"])) for g, s in h["groups"].items()}
    assert counts == {"g1": (30, 5), "g2": (6, 6), "g3": (4, 0)}
    assert max(v for v in h["groups"]["g1"]["p99_ms"] if v is not None) >= 60  # the 80 ms requests
    assert max(h["total"]["rps"]) > 0
    # Both workers served some (each connection lands on one): the answer is their sum.
    # (another worker's count is from its last announce to the router: wait for it)
    def per_worker() -> list[int]:
        return [w["requests"] for w in get_json(f"{busy.admin_url}/admin/shards")["workers"]]

    wait_until(lambda: sum(per_worker()) == 43, 10, what="both workers' requests in the shard table")
    assert len(per_worker()) == 2 and all(per_worker())
    one = get_json(f"{busy.admin_url}/admin/history?group=g2")
    assert set(one["groups"]) == {"g2"} and sum(one["groups"]["g2"]["errors"]) == 6
    assert sum(one["total"]["requests"]) == 43  # the total beside it
    missing = http("GET", f"{busy.admin_url}/admin/history?group=nope")
    assert missing.status == 404 and missing.json()["error"] == "unknown_group"


def test_page_counts_clients_and_connections(busy):
    page = http("GET", f"{busy.admin_url}/").body.decode()
    streams = get_json(f"{busy.admin_url}/admin/clients")["clients"]
    assert len(streams) > 2  # each client holds more than one connection
    assert 'id="clients-count">2<' in page and f'id="connections-count">{len(streams)}<' in page
    assert 'id="chart-total-rps"' in page and 'id="traffic"' in page
    picked = http("GET", f"{busy.admin_url}/?group=g2").body.decode()
    assert "<b>g2</b>" in picked and "group g2" in picked and "group g1" not in picked


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced PNG: enough for a screenshot."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _c, _f, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytes(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif kind == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = rows[-1]
    return width, bpp, rows


def _pixels_of(colour: str, bpp: int, rows: list[bytes], slack: int = 8) -> list[tuple[int, int]]:
    want = bytes.fromhex(colour[1:])
    found = []
    for y, row in enumerate(rows):
        for x in range(0, len(row), bpp):
            if all(abs(row[x + i] - want[i]) <= slack for i in range(3)):
                found.append((x // bpp, y))
    return found


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); CI installs it")
def test_page_in_headless_chromium_draws_a_chart(busy, tmp_path):
    shot = tmp_path / "status.png"
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,900",
             f"{busy.admin_url}/"],
            capture_output=True, text=True, timeout=60,
        )
    assert shot.exists(), out.stderr[-2000:]
    width, bpp, rows = read_png(shot)
    assert (width, len(rows)) == (1200, 900)
    line = _pixels_of(RPS_LINE, bpp, rows)  # the requests/s lines (crisp edges: their own colour)
    rows_of: dict[int, list[int]] = {}
    for x, y in line:
        rows_of.setdefault(y, []).append(x)
    # The total's chart is the first: its baseline is the first row the line runs along (15 minutes
    # of zero before the requests came) ...
    base = min((y for y, xs in rows_of.items() if max(xs) - min(xs) >= 250), default=None)
    assert base is not None, f"no requests/s line across a chart ({len(line)} pixels of its colour)"
    left = min(rows_of[base])
    chart = [(x, y) for x, y in line if base - 130 <= y <= base + 2]
    # ... and it rises at its right end, where the requests are: drawn data, not only a baseline.
    peak_x, peak_y = min(chart, key=lambda p: p[1])
    assert base - peak_y >= 30, f"the requests/s line rises {base - peak_y} px above its baseline"
    assert peak_x > left + 250, f"the peak is at x={peak_x}, not at the chart's right end (from x={left})"
    fill = [(x, y) for x, y in _pixels_of(RPS_FILL, bpp, rows) if base - 130 <= y <= base]
    assert all(x > left + 250 for x, _y in fill)  # the area under it, where a step is wider than the line
