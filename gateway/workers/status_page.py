"""The status page: one server-rendered HTML page, no build step and no
external assets. It reloads its own data every two seconds. Its graphs (the
last 15 minutes, /admin/history's series) are inline SVG drawn here."""
from __future__ import annotations

import html
import math
import time
from typing import Any
from urllib.parse import quote

__all__ = ["render_status_page"]

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f2f2f2} .ok{color:#176f2c} .bad{color:#b00020} .muted{color:#777}
.kpi{display:inline-block;margin-right:2em} .kpi b{font-size:1.4em}
.charts{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start} .chart{background:#fff}
.chart text{font:11px system-ui,sans-serif;fill:#555} h3{font-size:1em;margin:.8em 0 .2em}
.pick a{margin-right:.8em} .pick b{margin-right:.8em}
.banner{border:1px solid #e0c060;background:#fff8e0;padding:.5em .8em;margin:.5em 0}
.banner.bad{border-color:#d08080;background:#fdecec} .banner.ok{border-color:#8c8;background:#eefbea}
"""

# Replace the body with a fresh render every 2 s; no assets, no framework.
_SCRIPT = """
setInterval(async () => {
  try {
    const r = await fetch(location.pathname + location.search, {cache: "no-store"});
    if (r.ok) {
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      document.body.innerHTML = doc.body.innerHTML;
    }
  } catch (e) {}
}, 2000);
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not rows:
        body = f'<tr><td colspan="{len(headers)}" class="muted">none</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fleet_section(fleet: dict[str, Any] | None, now: float) -> str:
    """The nodes of the fleet as /admin/cluster shows them; nothing for one host (no `cluster`)."""
    if fleet is None:
        return ""
    up = fleet.get("registry_up")
    registry = '<span class="ok">up</span>' if up else '<span class="bad">down</span>'
    states = {"serving": "ok", "draining": "muted", "unreachable": "bad"}
    rows = []
    for n in fleet.get("nodes", ()):
        groups = ", ".join(f"{g}: {k}" for g, k in sorted(n.get("groups", {}).items())) or "none"
        seen = n.get("last_seen")
        ago = "never" if seen is None else f"{max(0.0, now - seen):.1f}s ago"
        rows.append([_e(n["node_id"]), _e(n.get("address", "")),
                     f'<span class="{states.get(n.get("state"), "bad")}">{_e(n.get("state"))}</span>',
                     _e(groups), _e(sum(n.get("groups", {}).values())), _e(ago),
                     "this node" if n["node_id"] == fleet.get("node_id") else ""])
    table = _table(["node", "address", "state", "groups (streams)", "streams", "last seen", ""], rows)
    return (f'<h2>Fleet</h2>\n<div id="fleet"><p>node <b>{_e(fleet.get("node_id"))}</b>; '
            f'registry {registry}; nodes <b>{len(rows)}</b></p>{table}</div>\n')


# The graphs: inline SVG drawn here, so the page's 2 s refresh redraws them with the rest.
RPS_LINE, RPS_FILL = "#1f77b4", "#9ecae1"
P50_LINE, P99_LINE = "#2ca02c", "#ff7f0e"
ERR_LINE, ERR_FILL = "#d62728", "#f4a3a3"
_W, _H, _LEFT, _TOP, _BOTTOM = 360, 150, 46, 20, 18
MAX_GROUP_CHARTS = 8  # groups drawn on the all-groups view (the busiest); ?group= shows any


def _nice(v: float) -> float:
    """The axis top for a largest value `v`: 1, 2 or 5 times a power of ten."""
    if v <= 0:
        return 1.0
    step = 10.0 ** math.floor(math.log10(v))
    return next(m * step for m in (1, 2, 5, 10) if v <= m * step * (1 + 1e-9))


def _num(v: float) -> str:
    return f"{v:g}" if v >= 1 or v == 0 else f"{v:.2g}"


def _chart(chart_id: str, title: str, lines: list[tuple[list[Any], str, str | None]]) -> str:
    """One chart: each of `lines` is (a value per bucket, None for no value; colour; fill colour
    under it or None); a gap in the values is a gap in the line."""
    n = max((len(v) for v, _c, _f in lines), default=0)
    top = _nice(max((x for v, _c, _f in lines for x in v if x is not None), default=0.0))
    pw, ph = _W - _LEFT - 6, _H - _TOP - _BOTTOM

    def x(i: int) -> str:  # the left edge of bucket i (each bucket is a step, as wide as its time)
        return f"{_LEFT + i * pw / max(n, 1):.1f}"

    def y(v: float) -> str:
        return f"{_TOP + ph - min(v, top) / top * ph:.1f}"

    # crispEdges: steps are straight lines, drawn in whole pixels of their own colour.
    parts = [f'<svg class="chart" id="{_e(chart_id)}" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
             f'role="img" aria-label="{_e(title)}" shape-rendering="crispEdges"><title>{_e(title)}</title>',
             f'<text x="{_LEFT}" y="13">{_e(title)}</text>']
    for frac in (0.0, 0.5, 1.0):
        gy = _TOP + ph - frac * ph
        parts.append(f'<line x1="{_LEFT}" y1="{gy:.1f}" x2="{_W - 6}" y2="{gy:.1f}" stroke="#ddd"/>'
                     f'<text x="{_LEFT - 4}" y="{gy + 4:.1f}" text-anchor="end">{_num(top * frac)}</text>')
    for label, frac in (("-15m", 0.0), ("-10m", 1 / 3), ("-5m", 2 / 3), ("now", 1.0)):
        anchor = "start" if frac == 0 else "end" if frac == 1 else "middle"
        parts.append(f'<text x="{_LEFT + frac * pw:.1f}" y="{_H - 4}" text-anchor="{anchor}">{label}</text>')
    for values, colour, fill in lines:
        runs: list[list[tuple[int, float]]] = [[]]
        for i, v in enumerate(values):
            if v is None:
                if runs[-1]:
                    runs.append([])
            else:
                runs[-1].append((i, v))
        for run in (r for r in runs if r):
            points = " ".join(f"{x(i)},{y(v)} {x(i + 1)},{y(v)}" for i, v in run)
            if fill:
                base = f"{x(run[-1][0] + 1)},{y(0)} {x(run[0][0])},{y(0)}"
                parts.append(f'<polygon points="{points} {base}" fill="{fill}" stroke="none"/>')
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
            if len(run) == 1:  # a lone bucket: a mark wide enough to see
                centre = _LEFT + (run[0][0] + 0.5) * pw / max(n, 1)
                parts.append(f'<circle cx="{centre:.1f}" cy="{y(run[0][1])}" r="3" fill="{colour}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _series_charts(key: str, name: str, series: dict[str, list[Any]]) -> str:
    """The three charts of one series (the total, or a group) and a line of the last minute."""
    rps, rate = series["rps"], [r * 100 for r in series["error_rate"]]
    requests, errors = sum(series["requests"][-12:]), sum(series["errors"][-12:])
    p99 = [v for v in series["p99_ms"][-12:] if v is not None]
    latest = (f'last minute: {requests / 60:.1f}/s, errors {errors / requests * 100 if requests else 0:.1f}%'
              + (f", p99 up to {max(p99):.1f} ms" if p99 else ""))
    return (f'<h3>{_e(name)} <span class="muted">{_e(latest)}</span></h3><div class="charts">'
            + _chart(f"chart-{key}-rps", "requests/s", [(rps, RPS_LINE, RPS_FILL)])
            + _chart(f"chart-{key}-latency", "latency, ms: p50 (green), p99 (orange)",
                     [(series["p50_ms"], P50_LINE, None), (series["p99_ms"], P99_LINE, None)])
            + _chart(f"chart-{key}-errors", "error rate, %", [(rate, ERR_LINE, ERR_FILL)])
            + "</div>")


def _traffic_section(history: dict[str, Any] | None) -> str:
    """Requests/s, p50/p99 latency and error rate over the last 15 minutes, in total and
    per group (the busiest on the all-groups view; a link picks one)."""
    if history is None:
        return ""
    groups = history["groups"]
    chosen = history.get("group")
    links = ['<b>all groups</b>' if chosen is None else '<a href="?">all groups</a>']
    links += [f"<b>{_e(g)}</b>" if g == chosen else f'<a href="?group={quote(g)}">{_e(g)}</a>' for g in sorted(groups)]
    busiest = sorted(groups, key=lambda g: (-sum(groups[g]["requests"]), g))
    shown = busiest if chosen is not None else busiest[:MAX_GROUP_CHARTS]
    more = len(groups) - len(shown)
    unanswered = history.get("workers", {}).get("unanswered", [])
    return ('<h2>Traffic, last 15 minutes</h2>\n<div id="traffic">'
            f'<p class="pick">{" ".join(links)}</p>'
            + _series_charts("total", "total", history["total"])
            + "".join(_series_charts(f"group-{i}", f"group {g}", groups[g]) for i, g in enumerate(shown))
            + (f'<p class="muted">{more} quieter groups not drawn: pick one above.</p>' if more > 0 else "")
            + (f'<p class="bad">no history from {_e(", ".join(unanswered))}</p>' if unanswered else "")
            + f'<p class="muted">{history["width"]} s buckets; an error is a 5xx answer.</p></div>\n')


# A decided rollout stays on the page for this long (seconds) after its decision.
RECENT_ROLLOUT = 3600


def _side(figures: dict[str, Any], side: str) -> str:
    f = figures.get(side) or {}
    p99 = f.get("p99_ms")
    rate = f.get("error_rate", 0) * 100
    return (f'{side} {_e(f.get("requests", 0))} requests, {rate:.1f}% errors'
            + (f", p99 {_e(p99)} ms" if p99 is not None else ""))


def _rollouts_section(rollouts: dict[str, Any] | None, now: float) -> str:
    """A banner per rollout baking, rolling back, or decided in the last hour."""
    lines = []
    for g, r in sorted(((rollouts or {}).get("groups") or {}).items()):
        state = r.get("state", "none")
        if state == "none" or (state not in ("baking", "rolling_back") and now - r.get("ended", 0) > RECENT_ROLLOUT):
            continue
        left = r.get("time_left", 0)
        ended = time.strftime("%H:%M:%S", time.localtime(r.get("ended", now)))
        what = f'Rollout of group <b>{_e(g)}</b>: version <b>{_e(r.get("new"))}</b> (from {_e(r.get("old"))}) '
        if state == "baking":
            figures = r.get("figures") or {}
            lines.append(f'<p class="banner">{what}<b>baking</b> on canary {_e(", ".join(r.get("canary", ())))}, '
                         f'{left:.0f} s left; {_side(figures, "canary")}; '
                         f'{_side(figures, "rest")}. {_e(r.get("reason", ""))}</p>')
        else:
            cls = "ok" if state == "promoted" else "bad"
            lines.append(f'<p class="banner {cls}">{what}<b>{_e(state.replace("_", " "))}</b> '
                         f'{ended}: '
                         f'{_e(r.get("reason", ""))}</p>')
    return f'<div id="rollouts">{"".join(lines)}</div>\n' if lines else ""


def render_status_page(workers: list[dict[str, Any]], versions: dict[str, str], router_ok: bool | None,
                       fleet: dict[str, Any] | None = None, *, history: dict[str, Any] | None = None,
                       rollouts: dict[str, Any] | None = None) -> str:
    """The page; `fleet` is /admin/cluster's view with `cluster` set (a Fleet section), else None;
    `history` is /admin/history's answer (the Traffic graphs), None for none; `rollouts`
    /admin/rollouts' (a banner for each rollout in progress or decided in the last hour)."""
    now = time.time()
    requests = sum(w.get("last_minute", {}).get("requests", 0) for w in workers)
    errors = sum(w.get("last_minute", {}).get("errors", 0) for w in workers)
    rate = f"{requests / 60:.1f}/s"
    err_rate = f"{(errors / requests * 100) if requests else 0:.1f}%"
    router = "n/a (one worker)" if router_ok is None else ('<span class="ok">up</span>' if router_ok
                                                          else '<span class="bad">down</span>')
    worker_rows = [
        [_e(w["worker"]), _e(w["pid"]), _e(f'{w["uptime"]:.0f}s'), _e(sum(w["streams"].values())),
         _e(w["inflight"]), _e(w["requests"]), _e(w.get("last_minute", {}).get("requests", 0)),
         _e(w.get("last_minute", {}).get("errors", 0)), _e(w["cross_frames_in"]), _e(w["cross_frames_out"])]
        for w in workers
    ]
    groups: dict[str, int] = {}
    clients = []
    for w in workers:
        for g, n in w["streams"].items():
            groups[g] = groups.get(g, 0) + n
        clients.extend(w["clients"])
    for g in versions:
        groups.setdefault(g, 0)
    # A client (group, client id) may hold several connections (streams): counted apart.
    distinct = {(c["group"], c["client_id"]) for c in clients}
    group_rows = [[_e(g), _e(sum(1 for dg, _c in distinct if dg == g)), _e(n), _e(versions.get(g, "")),
                   '<span class="ok">serving</span>' if n else '<span class="bad">no client</span>']
                  for g, n in sorted(groups.items())]
    client_rows = [
        [_e(c["client_id"]), _e(c["connection"]), _e(c["group"]), _e(c["worker"]), _e(c["remote"]),
         _e(f'{now - c["connected_at"]:.0f}s'), _e(c.get("config_version", "")), _e(c["pending"] + c["serving"]),
         '<span class="muted">draining</span>' if c["draining"] else '<span class="ok">healthy</span>']
        for c in sorted(clients, key=lambda c: (c["group"], c["connection"]))
    ]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tunnel-gateway status</title>
<style>{_STYLE}</style></head>
<body>
<h1>tunnel-gateway</h1>
<p><a id="inspector-link" href="/inspector">Inspector</a>: the last requests, their headers and bodies, replay</p>
<div><span class="kpi">workers <b>{len(workers)}</b></span>
<span class="kpi">clients <b id="clients-count">{len(distinct)}</b></span>
<span class="kpi">connections <b id="connections-count">{len(clients)}</b></span>
<span class="kpi">requests (last minute) <b id="rate">{_e(rate)}</b></span>
<span class="kpi">errors (last minute) <b id="errors">{_e(err_rate)}</b></span>
<span class="kpi">router {router}</span></div>
{_rollouts_section(rollouts, now)}{_traffic_section(history)}{_fleet_section(fleet, now)}<h2>Groups</h2>
{_table(["group", "clients", "connections", "config version", "state"], group_rows)}
<h2>Connected clients</h2>
<div id="clients">{_table(["client", "connection", "group", "worker", "remote", "connected", "config version", "in flight", "health"], client_rows)}</div>
<h2>Workers</h2>
{_table(["worker", "pid", "uptime", "streams", "in flight", "requests", "last minute", "errors (last minute)", "cross in", "cross out"], worker_rows)}
<p class="muted">Updated {_e(time.strftime("%H:%M:%S"))}; refreshes every 2 s.</p>
<script>{_SCRIPT}</script>
</body></html>
"""
