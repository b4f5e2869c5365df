"""A request target, normalised once: what the routes match is exactly what
is forwarded. Pure logic, no I/O.

* origin form `/path?query` and absolute form `http://host/path?query`
  (whose authority replaces the Host header, RFC 9112 3.2.2); anything
  else (`*`, `host:port`, a relative path) is refused;
* the path: dot segments removed (RFC 3986 5.2.4), their percent-encoded
  forms too (`%2e` is `.`, so `/a/%2e%2e/b` becomes `/b` like `/a/../b`);
  every other byte is kept as sent (an encoded slash `%2F` stays encoded and
  is never a separator; `%7E` is not rewritten); a malformed
  percent-encoding (`%zz`, `%2`) is refused;
* the query is kept as sent; a fragment (`#`) is refused: a client never
  sends one, and what follows it would mean one thing here and another at
  the upstream.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Target", "BadTarget", "normalise_target", "normalise_path", "remove_dot_segments", "with_host"]

_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ABSOLUTE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)$", re.S)
# Bytes a target never holds (RFC 9112: a target is visible ASCII); aiohttp's parser refuses most already.
_BAD_BYTES = re.compile(r"[\x00-\x20\x7f]")


class BadTarget(ValueError):
    """A target refused with 400 (`bad_target`), with why."""


@dataclass(frozen=True, slots=True)
class Target:
    host: str    # the authority routes match: the absolute form's, else the Host header
    path: str    # normalised
    query: str   # as sent, with its leading "?" (or "")

    @property
    def path_and_query(self) -> str:
        return self.path + self.query


def _dots(segment: str) -> str:
    """A segment with its percent-encoded dots decoded (only to tell a dot segment)."""
    return segment.replace("%2e", ".").replace("%2E", ".") if "%" in segment else segment


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on an absolute path; `%2e` counts as a dot."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        dots = _dots(seg)
        if dots == ".":
            if last:
                out.append("")
        elif dots == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def normalise_path(path: str) -> str:
    """An origin-form path (starting with /), normalised (see the module)."""
    if "%" in path:
        bad = _BAD_PERCENT.search(path)
        if bad is not None:
            raise BadTarget(f"bad percent-encoding {path[bad.start():bad.start() + 3]!r}")
    if "." in path or "%" in path:
        path = remove_dot_segments(path)
    return path


def with_host(headers: list[tuple[str, str]], host: str) -> list[tuple[str, str]]:
    """`headers` with Host set to `host` (the absolute form's authority, RFC 9112 3.2.2):
    the same list when it says so already."""
    if not any(n.lower() == "host" and v != host for n, v in headers):
        return headers
    return [(n, v) for n, v in headers if n.lower() != "host"] + [("Host", host)]


def normalise_target(target: str, host_header: str) -> Target:
    """The target of a request line, normalised; BadTarget when it cannot be routed."""
    if _BAD_BYTES.search(target):
        raise BadTarget("control character or space in the target")
    if "#" in target:
        raise BadTarget("a fragment (#) in the target")
    host = host_header
    if not target.startswith("/"):
        m = _ABSOLUTE.match(target)
        if m is None:
            raise BadTarget(f"not an origin-form or absolute-form target: {target[:100]!r}")
        scheme, authority, target = m.groups()
        if scheme.lower() not in ("http", "https"):
            raise BadTarget(f"scheme {scheme!r} is not http or https")
        if not authority or "@" in authority:
            raise BadTarget("absolute-form target without a host, or with user info")
        host = authority.lower()
        if not target.startswith("/"):  # "http://host" and "http://host?q" name "/"
            target = "/" + target
    path, sep, query = target.partition("?")
    return Target(host, normalise_path(path), sep + query)
