"""A request head that came up (or down) a tunnel, checked before any of it
reaches an upstream. Pure logic; the twin of `response_head.py`.

The peer is untrusted both ways: a tunnel client's egress request goes to the
gateway's backends, the gateway's ingress request to a client's. The serving
side writes the head to an HTTP/1.1 upstream, where a byte that ends a line
early, a method that is no token, or framing headers the serving side does
not apply would let the peer smuggle a second request onto a pooled
keep-alive connection. `gateway.dispatch` passes every head through
`check_request_head` first. A bad head is a TunnelError("bad_request") (400);
a good one comes back with the hop-by-hop headers dropped (the serving side
frames the body itself), order, case and repeats of the rest kept, and the
body's declared length, which the upstream client enforces.
"""
from __future__ import annotations

from typing import Iterable

from gateway.http.headers import HOP_BY_HOP
from gateway.http.response_head import _MAX_LENGTH_DIGITS, _TOKEN, _TOKENS_KEPT, first_non_token, is_field_text
from gateway.http.target import _BAD_BYTES
from gateway.tunnel.errors import TunnelError

__all__ = ["check_request_head"]

# Methods found to be tokens: a few recur (GET, POST...), checked once (bounded).
_METHODS_SEEN: set[str] = set()


def _bad(message: str) -> TunnelError:
    return TunnelError("bad_request", f"the peer sent an invalid request head: {message}")


def check_request_head(method: str, path: str,
                       headers: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], int | None]:
    """`headers` as they came through the tunnel, checked (see the module's doc):
    the headers fit to send, without hop-by-hop ones, and the declared
    Content-Length (its one header left in them), None if none. A pair, not an
    object: this runs on every request.
    Upgrade is dropped like any hop-by-hop header: a WebSocket is asked for by the
    head's scheme (ws, wss), and the serving side's client writes its handshake
    headers itself. Raises TunnelError("bad_request") naming what is wrong."""
    if method not in _METHODS_SEEN:
        if not _TOKEN.fullmatch(method):
            raise _bad("the method is not a token")
        if len(_METHODS_SEEN) < _TOKENS_KEPT:
            _METHODS_SEEN.add(method)
    # The target is re-checked when normalised; here so that the check stands alone.
    if _BAD_BYTES.search(path):
        raise _bad("a control character or space in the target")
    pairs = headers if isinstance(headers, list) else list(headers)
    if not pairs:
        return pairs, None
    # Whole-list operations in C, not a loop of Python per header: this runs on
    # every request of both directions. The messages reach the peer: they say
    # what is wrong, never repeat what was sent.
    names, values = zip(*pairs)
    bad_name = first_non_token(names)
    if bad_name >= 0:
        raise _bad(f"the name of header {bad_name + 1} is not a token")
    # All the values at once, joined by a space (allowed in a value, so no bad
    # byte is made at a seam).
    if not is_field_text(" ".join(values)):
        i = next(i for i, value in enumerate(values) if not is_field_text(value))
        raise _bad(f"a control character in the value of header {i + 1}")
    joined = "\n".join(names).lower()  # tokens: no name holds a "\n"
    lows = joined.split("\n")
    length: int | None = None
    if "content-length" in lows:
        # Exactly one value, digits only: a list, a sign or a second header is
        # what two parsers read two ways.
        if lows.count("content-length") > 1:
            raise _bad("more than one Content-Length")
        at = lows.index("content-length")
        digits = values[at].strip(" \t")
        if not (digits.isdigit() and digits.isascii()) or len(digits) > _MAX_LENGTH_DIGITS:
            raise _bad("a Content-Length that is not a number")
        length = int(digits)
        if digits != values[at]:
            pairs = pairs.copy()
            pairs[at] = (names[at], digits)
    if HOP_BY_HOP.isdisjoint(lows) and "proxy-" not in joined:
        return pairs, length  # the usual head: nothing to drop
    if length is not None and "transfer-encoding" in lows:
        raise _bad("both Transfer-Encoding and Content-Length")
    named = {t.strip(" \t").lower() for low, value in zip(lows, values) if low == "connection"
             for t in value.split(",")}
    named.discard("content-length")  # framing, checked above: it stays
    # HOP_BY_HOP: Connection, Keep-Alive, Transfer-Encoding, TE, Trailer, Upgrade,
    # Proxy-Connection (RFC 9110 7.6.1). Proxy-Authorization goes on, as
    # `headers.end_to_end` lets it at the entries.
    kept = [pair for pair, low in zip(pairs, lows)
            if low not in HOP_BY_HOP and low not in named
            and not (low.startswith("proxy-") and low != "proxy-authorization")]
    return kept, length
