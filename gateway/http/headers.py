"""What a proxy changes in an HTTP message, and nothing more. Pure logic."""
from __future__ import annotations

import functools
import ipaddress
from typing import Iterable

from gateway.rules import Rule

__all__ = ["HOP_BY_HOP", "end_to_end", "forwarded", "is_trusted", "apply_rule", "header_bytes", "has_body_response"]

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "transfer-encoding", "upgrade", "trailer", "proxy-connection"}
)

_HOP_BY_HOP_RAW = frozenset(h.encode() for h in HOP_BY_HOP)

Pairs = list[tuple[str, str]]


def end_to_end(raw: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset(), *,
               response: bool = False) -> Pairs:
    """aiohttp's raw headers as str pairs (latin-1; order, case and repeats
    kept) without the hop-by-hop ones: the fixed set, Proxy-*, and those
    Connection names; nor the lower-case names in `drop`. A request's
    Proxy-Authorization goes on like any end-to-end header (as nginx passes
    it to its upstream); a `response`'s Proxy-* never do."""
    out = []
    named: set[str] = set()
    for n, v in raw:
        low = n.lower()
        if low in _HOP_BY_HOP_RAW or low in drop or (
                low.startswith(b"proxy-") and (response or low != b"proxy-authorization")):
            if low == b"connection":
                named.update(t.strip().lower() for t in v.decode("latin-1").split(",") if t.strip())
            continue
        out.append((n.decode("latin-1"), v.decode("latin-1")))
    named.difference_update(HOP_BY_HOP)  # already gone; usually all Connection names
    if named:
        out = [(n, v) for n, v in out if n.lower() not in named]
    return out


# What a caller says of where a request came from: kept from a trusted proxy
# only. Forwarded (RFC 7239) is not merged here: a trusted proxy's passes on,
# anyone else's is dropped.
_X_FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
_PROVENANCE = _X_FORWARDED | {"forwarded"}


def forwarded(headers: Pairs, *, remote: str, proto: str, host: str, trusted: bool = False) -> Pairs:
    """X-Forwarded-For, -Proto and -Host. A `trusted` caller (a proxy in
    trusted_proxies) has the caller appended to its X-Forwarded-For and its
    -Proto, -Host and Forwarded kept (-Proto and -Host set when absent);
    anyone else's are dropped and set here (Forwarded just dropped), so a
    caller cannot make an upstream believe another address. Names that
    differ from these only by `_` for `-` (X_Forwarded_For) are dropped
    from anyone: a CGI or WSGI backend reads them as the real ones."""
    xff = None
    out = []
    have_proto = have_host = False
    for pair in headers:
        low = pair[0].lower()
        if low not in _PROVENANCE:
            if "_" not in low or low.replace("_", "-") not in _X_FORWARDED:
                out.append(pair)
            continue
        if not trusted:
            continue
        if low == "x-forwarded-for":
            xff = f"{xff}, {pair[1]}" if xff else pair[1]
            continue
        if low == "x-forwarded-proto":
            have_proto = True
        elif low == "x-forwarded-host":
            have_host = True
        out.append(pair)
    if remote:
        xff = f"{xff}, {remote}" if xff else remote
    if xff:
        out.append(("X-Forwarded-For", xff))
    if not have_proto:
        out.append(("X-Forwarded-Proto", proto))
    if not have_host and host:
        out.append(("X-Forwarded-Host", host))
    return out


@functools.lru_cache(maxsize=16)
def _networks(trusted_proxies: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in trusted_proxies)


def is_trusted(remote: str | None, trusted_proxies: tuple[str, ...]) -> bool:
    """Whether a caller's address is in `trusted_proxies` (addresses or CIDRs, as validated at load)."""
    if not remote or not trusted_proxies:
        return False
    return _is_trusted(remote, trusted_proxies)


# Callers come back (keep-alive, a proxy in front): the answer is kept per
# address and setting, bounded (a scan of many addresses only evicts).
@functools.lru_cache(maxsize=4096)
def _is_trusted(remote: str, trusted_proxies: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(remote.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in _networks(trusted_proxies))


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
