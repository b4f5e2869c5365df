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
from operator import itemgetter
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
# Latin-1 bytes to 0 (a control but HTAB, or DEL) or 1: a translate and a
# search for 0 check a whole head's values in C, in a third of the regex's time.
_CONTROLS = bytes(0 if (b < 0x20 and b != 0x09) or b == 0x7f else 1 for b in range(256))
_MAX_LENGTH_DIGITS = 18
# Names found to be tokens: most responses repeat a few, checked once (bounded).
_TOKENS_SEEN: set[str] = set()
_TOKENS_KEPT = 4096
_NAME, _VALUE = itemgetter(0), itemgetter(1)


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


def is_field_text(text: str) -> bool:
    """Whether `text` is fit for a field value or a reason phrase: HTAB, SP,
    VCHAR and obs-text only (so no CR, LF, NUL, other control or DEL)."""
    try:
        return 0 not in text.encode("latin-1").translate(_CONTROLS)
    except UnicodeEncodeError:  # beyond latin-1
        return False


def first_non_token(names: Iterable[str]) -> int:
    """The index of the first of `names` that is no token, -1 when all are
    (those learnt into _TOKENS_SEEN, up to _TOKENS_KEPT)."""
    for i, name in enumerate(names):
        if name in _TOKENS_SEEN:
            continue
        if not _TOKEN.fullmatch(name):
            return i
        if len(_TOKENS_SEEN) < _TOKENS_KEPT:
            _TOKENS_SEEN.add(name)
    return -1


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
    if not is_field_text(reason):
        raise _bad("a control character in the reason phrase")
    pairs = headers if isinstance(headers, list) else list(headers)
    if not pairs:
        return CheckedHead(status, reason, [], None)
    # Whole-head operations in C, not a loop of Python per header: this runs on
    # every response. The messages reach the caller: they say what is wrong,
    # never repeat what was sent.
    names = list(map(_NAME, pairs))
    if not _TOKENS_SEEN.issuperset(names) and (i := first_non_token(names)) >= 0:
        raise _bad(f"the name of header {i + 1} is not a token")
    if not is_field_text("".join(map(_VALUE, pairs))):
        name = next(name for name, value in pairs if not is_field_text(value))
        raise _bad(f"a control character in the value of {name}")
    joined = "\n".join(names).lower()  # tokens: no name holds a "\n"
    lows = joined.split("\n")
    if RESPONSE_HOP_BY_HOP.isdisjoint(lows) and "proxy-" not in joined:
        # The usual head: nothing to drop, and at most one plain Content-Length
        # is kept as it is (anything else is re-made below).
        if "content-length" not in lows:
            return CheckedHead(status, reason, list(pairs), None)
        if lows.count("content-length") == 1:
            value = pairs[lows.index("content-length")][1]
            if value.isdigit() and value.isascii() and len(value) <= _MAX_LENGTH_DIGITS and (
                    value[0] != "0" or value == "0"):
                return CheckedHead(status, reason, list(pairs), int(value))
    return _framed(status, reason, pairs, lows)


def _framed(status: int, reason: str, pairs: list[tuple[str, str]], lows: list[str]) -> CheckedHead:
    """A head of checked names and values (`lows`: the names in lower case)
    with its hop-by-hop headers dropped and its Content-Length checked and made one."""
    kept: list[tuple[str, str]] = []
    named: set[str] = set()
    length: int | None = None
    length_at = -1  # where the one Content-Length kept is
    chunked = False
    for pair, low in zip(pairs, lows):
        if low == "content-length":
            for part in pair[1].split(","):
                part = part.strip(" \t")
                if not part.isdigit() or not part.isascii() or len(part) > _MAX_LENGTH_DIGITS:
                    raise _bad("a Content-Length that is not a number")
                if length is not None and int(part) != length:
                    raise _bad("Content-Length values that differ")
                length = int(part)
            if length_at < 0:
                length_at = len(kept)
                kept.append((pair[0], str(length)))
            continue
        if low in RESPONSE_HOP_BY_HOP or low.startswith("proxy-"):
            if low == "connection":
                named.update(t.strip(" \t").lower() for t in pair[1].split(","))
            elif low == "transfer-encoding":
                chunked = True
            if not (low == "upgrade" and status == 101):
                continue
        kept.append(pair)
    if chunked and length is not None:
        raise _bad("both Transfer-Encoding and Content-Length")
    # Those already dropped (or Upgrade kept on a 101) are usually all Connection
    # names; Content-Length is framing, checked above: it stays.
    named -= RESPONSE_HOP_BY_HOP
    named.discard("")
    named.discard("content-length")
    if named:
        kept = [pair for pair in kept if pair[0].lower() not in named]
    return CheckedHead(status, reason, kept, length)
