"""A response head that came down a tunnel, checked and re-framed before any
of it reaches a caller. Pure logic.

A tunnel client is untrusted: its head may carry a status no HTTP/1.1 parser
expects, bytes that end a header line early, or framing headers that make
the caller read part of the body as a second response (response splitting).
Every entry (HTTP ingress and egress, the WebSocket bridge, the gRPC entry)
passes the head through `check_response_head` first. A bad head is a
TunnelError("bad_response") (502); a good one comes back with the hop-by-hop
headers dropped, order, case and repeats of the rest kept, and the body's
declared length, which the entry enforces (it frames the body itself).
"""
from __future__ import annotations

import re
from typing import Iterable

from gateway.tunnel.errors import TunnelError

__all__ = ["CheckedHead", "check_response_head", "RESPONSE_HOP_BY_HOP"]

# Hop-by-hop headers of a response (RFC 9110 7.6.1), besides those Connection
# names and any Proxy-*; Upgrade stays on a 101 that answers an upgrade.
RESPONSE_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
)

# field-name = token (RFC 9110 5.1); field-value and reason-phrase: HTAB, SP,
# VCHAR, obs-text (latin-1 0x80-0xff); so never CR, LF, NUL or another control.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_TEXT = re.compile(r"[^\t\x20-\x7e\x80-\xff]")
_MAX_LENGTH_DIGITS = 18
# Names found to be tokens: most responses repeat a few, checked once (bounded).
_TOKENS_SEEN: set[str] = set()
_TOKENS_KEPT = 4096


class CheckedHead:
    """A head fit to send: `headers` without hop-by-hop ones; `length` is the
    declared Content-Length (one value left in `headers`), None if none."""

    __slots__ = ("status", "reason", "headers", "length")

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], length: int | None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.length = length

    def __repr__(self) -> str:
        return f"CheckedHead({self.status}, {self.reason!r}, {self.headers!r}, length={self.length})"


def _bad(message: str) -> TunnelError:
    return TunnelError("bad_response", f"the tunnel client sent an invalid response head: {message}")


def check_response_head(status: int, reason: str, headers: Iterable[tuple[str, str]], *,
                        upgrade: bool = False) -> CheckedHead:
    """`headers` as they came down the tunnel, checked (see the module's doc).
    `upgrade`: the caller asked to switch protocols, so a 101 is a valid answer.
    Raises TunnelError("bad_response") naming what is wrong."""
    if not 100 <= status <= 599:
        raise _bad(f"status {status} is not 100-599")
    if status == 101:
        if not upgrade:
            raise _bad("101 to a request that did not ask to upgrade")
    elif status < 200:
        # An interim answer (103 is dropped before it gets here) is no final one.
        raise _bad(f"{status} as a final status")
    if _BAD_TEXT.search(reason):
        raise _bad("a control character in the reason phrase")
    kept: list[tuple[str, str]] = []
    named: set[str] = set()
    length: int | None = None
    length_at = -1  # where the one Content-Length kept is
    chunked = False
    # The messages reach the caller: they say what is wrong, never repeat what was sent.
    for i, (name, value) in enumerate(headers):
        if name not in _TOKENS_SEEN:
            if not _TOKEN.fullmatch(name):
                raise _bad(f"the name of header {i + 1} is not a token")
            if len(_TOKENS_SEEN) < _TOKENS_KEPT:
                _TOKENS_SEEN.add(name)
        if _BAD_TEXT.search(value):
            raise _bad(f"a control character in the value of {name}")
        low = name.lower()
        if low == "content-length":
            for part in value.split(","):
                part = part.strip(" \t")
                if not part.isdigit() or not part.isascii() or len(part) > _MAX_LENGTH_DIGITS:
                    raise _bad("a Content-Length that is not a number")
                if length is not None and int(part) != length:
                    raise _bad("Content-Length values that differ")
                length = int(part)
            if length_at < 0:
                length_at = len(kept)
                kept.append((name, str(length)))
            continue
        if low in RESPONSE_HOP_BY_HOP or low.startswith("proxy-"):
            if low == "connection":
                named.update(t.strip(" \t").lower() for t in value.split(","))
            elif low == "transfer-encoding":
                chunked = True
            if not (low == "upgrade" and status == 101):
                continue
        kept.append((name, value))
    if chunked and length is not None:
        raise _bad("both Transfer-Encoding and Content-Length")
    named.discard("")
    named.discard("upgrade" if status == 101 else "")
    if named:
        kept = [(n, v) for n, v in kept if n.lower() not in named or n.lower() == "content-length"]
    return CheckedHead(status, reason, kept, length)
