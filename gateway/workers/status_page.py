"""The status page: one server-rendered HTML page, no build step and no
external assets. It reloads its own data every two seconds."""
from __future__ import annotations

import html
import time
from typing import Any

__all__ = ["render_status_page"]

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f2f2f2} .ok{color:#176f2c} .bad{color:#b00020} .muted{color:#777}
.kpi{display:inline-block;margin-right:2em} .kpi b{font-size:1.4em}
"""

# Replace the body with a fresh render every 2 s; no assets, no framework.
_SCRIPT = """
setInterval(async () => {
  try {
    const r = await fetch(location.pathname, {cache: "no-store"});
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


def render_status_page(workers: list[dict[str, Any]], versions: dict[str, str], router_ok: bool | None,
                       fleet: dict[str, Any] | None = None) -> str:
    """The page; `fleet` is /admin/cluster's view with `cluster` set (a Fleet section), else None."""
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
    group_rows = [[_e(g), _e(n), _e(versions.get(g, "")),
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
<div><span class="kpi">workers <b>{len(workers)}</b></span>
<span class="kpi">clients <b>{len(clients)}</b></span>
<span class="kpi">requests (last minute) <b id="rate">{_e(rate)}</b></span>
<span class="kpi">errors (last minute) <b id="errors">{_e(err_rate)}</b></span>
<span class="kpi">router {router}</span></div>
{_fleet_section(fleet, now)}<h2>Groups</h2>
{_table(["group", "streams", "config version", "state"], group_rows)}
<h2>Connected clients</h2>
<div id="clients">{_table(["client", "connection", "group", "worker", "remote", "connected", "config version", "in flight", "health"], client_rows)}</div>
<h2>Workers</h2>
{_table(["worker", "pid", "uptime", "streams", "in flight", "requests", "last minute", "errors (last minute)", "cross in", "cross out"], worker_rows)}
<p class="muted">Updated {_e(time.strftime("%H:%M:%S"))}; refreshes every 2 s.</p>
<script>{_SCRIPT}</script>
</body></html>
"""
