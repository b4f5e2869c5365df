"""The Inspector's pages, server-rendered HTML with no external assets, for the
gateway's admin port and the client's: the list of the last requests (filter by
group and status; it refreshes itself every 2 s), one request's detail (headers,
bodies as text, JSON pretty-printed or hex) and its Replay button (a form POST).
Pure: entries in (gateway/inspection.py's `entry` shape), HTML out."""
from __future__ import annotations

import base64
import binascii
import html
import json
from typing import Any, Mapping
from urllib.parse import quote

from aiohttp import web

__all__ = ["render_list", "render_detail", "render_refused", "body_view", "html_response", "replay_answer"]

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.2em}
table{border-collapse:collapse;margin:.5em 0} th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left}
th{background:#f2f2f2} .ok{color:#176f2c} .bad{color:#b00020} .muted{color:#777}
pre{background:#f7f7f7;border:1px solid #ddd;padding:.6em;max-height:30em;overflow:auto;white-space:pre-wrap}
td.h{font-family:monospace} form.inline{display:inline}
"""

# Refresh the list (only the table: the filter form keeps what is typed); no framework, no assets.
_SCRIPT = """
setInterval(async () => {
  try {
    const r = await fetch(location.pathname + location.search, {cache: "no-store"});
    if (r.ok) {
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      const fresh = doc.getElementById("requests");
      if (fresh) document.getElementById("requests").replaceWith(fresh);
    }
  } catch (e) {}
}, 2000);
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _page(title: str, body: str, script: str = "") -> str:
    tail = f"<script>{script}</script>\n" if script else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body>\n{body}\n{tail}</body></html>\n")


def _status(entry: Mapping[str, Any]) -> str:
    status = entry.get("status") or 0
    cls = "bad" if status >= 500 or entry.get("error") else "ok" if status else "muted"
    shown = status or "-"
    error = f' <span class="bad">{_e(entry["error"])}</span>' if entry.get("error") else ""
    return f'<span class="{cls}">{_e(shown)}</span>{error}'


def _target(entry: Mapping[str, Any]) -> str:
    return entry["path"] + (f"?{entry['query']}" if entry.get("query") else "")


def render_list(rows: list[Mapping[str, Any]], *, base: str, query: Mapping[str, str], problem: str = "",
                title: str = "tunnel-gateway", home: str = "") -> str:
    """The list: newest first, each row linking to its detail page."""
    form = (f'<form id="filter" method="get" action="{_e(base)}">group <input name="group" size="12" '
            f'value="{_e(query.get("group", ""))}"> status <input name="status" size="6" placeholder="5xx" '
            f'value="{_e(query.get("status", ""))}"> <button type="submit">Filter</button> '
            f'<a href="{_e(base)}">all</a></form>')
    head = "".join(f"<th>{h}</th>" for h in ("time", "method", "host", "path", "status", "duration", "group",
                                              "client", "id"))
    body = []
    for e in rows:
        link = f"{base}/{quote(e['id'], safe='')}"
        replay = f' <span class="muted">replay of {_e(e["replay_of"])}</span>' if e.get("replay_of") else ""
        body.append(
            f'<tr class="request" data-id="{_e(e["id"])}"><td>{_e(e["time"][11:23])}</td><td>{_e(e["method"])}</td>'
            f'<td>{_e(e["host"])}</td><td><a href="{_e(link)}">{_e(_target(e))}</a>{replay}</td>'
            f'<td>{_status(e)}</td><td>{e["duration"] * 1000:.1f} ms{"" if e.get("done", True) else " …"}</td>'
            f'<td>{_e(e.get("group", ""))}</td><td>{_e(e.get("client_id", ""))}</td><td class="h">{_e(e["id"])}</td></tr>')
    if not body:
        body.append('<tr><td colspan="9" class="muted">no requests yet</td></tr>')
    note = f'<p class="bad">{_e(problem)}</p>' if problem else ""
    back = f' <a href="{_e(home)}">status</a>' if home else ""
    return _page(f"{title} inspector", f"<h1>{_e(title)}: Inspector</h1>\n<p>The last requests, newest first; "
                 f"secrets in headers and queries are masked.{back}</p>\n{form}{note}\n"
                 f'<table id="requests"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>',
                 _SCRIPT)


def _headers(pairs: list[list[str]], table_id: str) -> str:
    rows = "".join(f'<tr><td class="h">{_e(k)}</td><td class="h">{_e(v)}</td></tr>' for k, v in pairs)
    return f'<table id="{table_id}"><tbody>{rows or "<tr><td class=muted>none</td></tr>"}</tbody></table>'


def _hexdump(data: bytes) -> str:
    lines = []
    for at in range(0, len(data), 16):
        row = data[at:at + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{at:08x}  {row.hex(' '):<47}  {text}")
    return "\n".join(lines)


def body_view(text: str, encoding: str, headers: list[list[str]]) -> tuple[str, str]:
    """(kind, shown) of a body preview: ("json", pretty-printed), ("text", as is) or ("hex", a dump)."""
    if encoding == "base64":
        try:
            return "hex", _hexdump(base64.b64decode(text))
        except (binascii.Error, ValueError):
            return "text", text
    kind = next((v.lower() for k, v in headers if k.lower() == "content-type"), "")
    if "json" in kind or text[:1] in ("{", "["):
        try:
            return "json", json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except ValueError:
            pass
    return "text", text


def _body(entry: Mapping[str, Any], side: str) -> str:
    text = entry[f"{side}_body"]
    size = entry.get(f"{side}_size", len(text))
    if not size:
        return '<p class="muted">no body</p>'
    kind, shown = body_view(text, entry.get(f"{side}_body_encoding", "text"), entry[f"{side}_headers"])
    cut = f"; the first {len(text)} shown" if entry.get(f"{side}_truncated") else ""
    return f'<p class="muted">{_e(size)} bytes, {kind}{cut}</p><pre id="{side}-body">{_e(shown)}</pre>'


def render_detail(entry: Mapping[str, Any], *, base: str) -> str:
    """One request: what it was, what it got, and a Replay button."""
    rid = quote(entry["id"], safe="")
    facts = [("id", entry["id"]), ("time", entry["time"]), ("group", entry.get("group", "")),
             ("client", entry.get("client_id", "")), ("duration", f'{entry["duration"] * 1000:.1f} ms'),
             ("replay of", entry.get("replay_of", ""))]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts if v)
    why = ""
    if entry.get("websocket"):
        why = "a WebSocket cannot be replayed"
    elif entry.get("request_truncated"):
        why = "its body was not captured whole: the replay will be refused"
    replay = (f'<form class="inline" method="post" action="{_e(base)}/{_e(rid)}/replay">'
              f'<button id="replay" type="submit">Replay</button></form>'
              + (f' <span class="muted">{_e(why)}</span>' if why else ""))
    body = (f'<p><a href="{_e(base)}">all requests</a></p>\n'
            f'<h1 id="summary">{_e(entry["method"])} {_e(entry["host"])}{_e(_target(entry))} {_status(entry)}</h1>\n'
            f"<table>{rows}</table>\n<p>{replay}</p>\n"
            f"<h2>Request headers</h2>\n{_headers(entry['request_headers'], 'request-headers')}\n"
            f"<h2>Request body</h2>\n{_body(entry, 'request')}\n"
            f"<h2>Response headers</h2>\n{_headers(entry['response_headers'], 'response-headers')}\n"
            f"<h2>Response body</h2>\n{_body(entry, 'response')}")
    return _page(f"request {entry['id']}", body)


def render_refused(request_id: str, error: str, message: str, *, base: str) -> str:
    """Why a request cannot be shown or replayed (unknown id, body not captured)."""
    link = f"{base}/{quote(request_id, safe='')}"
    return _page("inspector", f'<p><a href="{_e(base)}">all requests</a> · <a href="{_e(link)}">the request</a></p>'
                 f'<h1 class="bad" id="refused">{_e(error)}</h1><p>{_e(message)}</p>')


def html_response(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", headers={"Cache-Control": "no-store"})


def replay_answer(request_id: str, status: int, body: Mapping[str, Any]) -> web.Response:
    """The Replay button's answer: to the new entry's page, or the page saying why not."""
    if status == 200:
        raise web.HTTPSeeOther(f"/inspector/{body['id']}")
    return html_response(render_refused(request_id, body["error"], body["message"], base="/inspector"), status)
