"""What a proxy changes in an HTTP message, and nothing more. Pure logic."""
from __future__ import annotations

from typing import Iterable

from gateway.rules import Rule

__all__ = ["HOP_BY_HOP", "end_to_end", "forwarded", "apply_rule", "header_bytes", "has_body_response"]

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "transfer-encoding", "upgrade", "trailer", "proxy-connection",
     "proxy-authenticate", "proxy-authorization"}
)

_HOP_BY_HOP_RAW = frozenset(h.encode() for h in HOP_BY_HOP)

Pairs = list[tuple[str, str]]


def end_to_end(raw: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()) -> Pairs:
    """aiohttp's raw headers as str pairs (latin-1; order, case and repeats
    kept) without the hop-by-hop ones: the fixed set, Proxy-*, and those
    Connection names; nor the lower-case names in `drop`."""
    out = []
    named: set[str] = set()
    for n, v in raw:
        low = n.lower()
        if low in _HOP_BY_HOP_RAW or low.startswith(b"proxy-") or low in drop:
            if low == b"connection":
                named.update(t.strip().lower() for t in v.decode("latin-1").split(",") if t.strip())
            continue
        out.append((n.decode("latin-1"), v.decode("latin-1")))
    named.difference_update(HOP_BY_HOP)  # already gone; usually all Connection names
    if named:
        out = [(n, v) for n, v in out if n.lower() not in named]
    return out


def forwarded(headers: Pairs, *, remote: str, proto: str, host: str) -> Pairs:
    """Append the caller to X-Forwarded-For; set X-Forwarded-Proto/-Host if absent."""
    xff = None
    out = []
    have_proto = have_host = False
    for n, v in headers:
        low = n.lower()
        if low == "x-forwarded-for":
            xff = f"{xff}, {v}" if xff else v
            continue
        have_proto |= low == "x-forwarded-proto"
        have_host |= low == "x-forwarded-host"
        out.append((n, v))
    if remote:
        xff = f"{xff}, {remote}" if xff else remote
    if xff:
        out.append(("X-Forwarded-For", xff))
    if not have_proto:
        out.append(("X-Forwarded-Proto", proto))
    if not have_host and host:
        out.append(("X-Forwarded-Host", host))
    return out


def apply_rule(headers: Pairs, rule: Rule) -> Pairs:
    """Header edits of a rule: remove, then add (replacing), then set_host.
    A rule without edits returns `headers` itself."""
    if not (rule.remove_headers or rule.add_headers or rule.set_host):
        return headers
    drop = set(rule.remove_headers) | {n for n, _ in rule.add_headers}
    if rule.set_host:
        drop.add("host")
    out = [(n, v) for n, v in headers if n.lower() not in drop] if drop else list(headers)
    out.extend(rule.add_headers)
    if rule.set_host:
        out.append(("Host", rule.set_host))
    return out


def header_bytes(raw: Iterable[tuple[bytes, bytes]]) -> int:
    return sum(len(n) + len(v) + 4 for n, v in raw)


def has_body_response(method: str, status: int) -> bool:
    return not (method == "HEAD" or status in (204, 304) or 100 <= status < 200)
