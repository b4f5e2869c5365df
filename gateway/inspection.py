"""The inspector's capture: the last N requests an entry served, each with its
headers and the first bytes of its bodies, kept in a ring for the admin port to
show and replay. Pure: no I/O, nothing awaited.

Capture is cheap on the request path: one small object per request, appended to
a deque(maxlen=N) when the request starts (so a stream shows while it runs);
body chunks are kept by reference until the preview limit is reached (a view
of a read, or a buffer that is reused, has its preview's part copied: `_kept`);
headers are the request's own tuples, decoded and masked only when someone
looks (`entry`)."""
from __future__ import annotations

import base64
import collections
import time
from typing import Any, Iterable

from gateway.exposure import MASK, mask_headers
from gateway.observe import mask_query

__all__ = ["Capture", "Inspector", "NotReplayable", "REPLAY_HEADER", "header_names", "process_inspector",
           "status_filter"]

# Marks a replayed request (its value: the id of the entry replayed); shown as the entry's `replay_of`.
REPLAY_HEADER = "x-tunnel-replay"

# Not sent again by a replay: the connection's own (the replay frames its body with Content-Length).
_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
                  "content-length", "expect", REPLAY_HEADER})


def header_names(v: Any) -> tuple[str, ...]:
    """Header names, as a TOML list or one comma-separated string (flag, environment); lower-cased."""
    items = [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) and i.strip() for i in items):
        raise ValueError("must be a list of header names")
    return tuple(i.strip().lower() for i in items)


def status_filter(text: str) -> Any:
    """?status= as a test of a status: `404`, a class `5xx`, or `error` (the request failed
    with an error code); ValueError for anything else."""
    text = text.strip().lower()
    if text == "error":
        return lambda status, error: bool(error)
    if len(text) == 3 and text[0] in "12345" and text[1:] == "xx":
        low = int(text[0]) * 100
        return lambda status, error: low <= status < low + 100
    if text.isdigit() and len(text) == 3:
        want = int(text)
        return lambda status, error: status == want
    raise ValueError("status must be a status (404), a class (5xx) or error")


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def _pairs(headers: Any) -> list[tuple[str, str]]:
    """Headers as (name, value) strings: raw byte pairs, a multidict, or pairs already."""
    if headers is None:
        return []
    items = headers.items() if hasattr(headers, "items") else headers
    return [(_text(k), _text(v)) for k, v in items]


def _kept(chunk: Any, room: int) -> bytes:
    """What a capture keeps of a body chunk: bytes by reference; of a view (which would keep
    its whole read alive) or a buffer that is reused, its first `room` bytes, copied."""
    return chunk if type(chunk) is bytes else bytes(chunk[:room])


def _body(chunks: list[Any], limit: int) -> bytes:
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return bytes(data[:limit])


def _shown_body(data: bytes, cut: bool) -> tuple[str, str]:
    """(text, encoding): the body as UTF-8 text when it is, else base64. A preview cut
    inside a character still reads as text."""
    try:
        return data.decode("utf-8"), "text"
    except UnicodeDecodeError as exc:
        if cut and exc.start >= len(data) - 3 and exc.reason == "unexpected end of data":
            return data[:exc.start].decode("utf-8"), "text"
    return base64.b64encode(data).decode(), "base64"


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class NotReplayable(Exception):
    """A captured request that cannot be sent again: `code` (body_not_captured, websocket), why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Capture:
    """One request as the inspector keeps it. `rec` is its access record (id, method,
    host, path with query, status, duration, group, client id, error: read when shown)."""

    __slots__ = ("rec", "request_headers", "response_headers", "_req", "req_size", "req_done", "_resp",
                 "resp_size", "limit", "done")

    def __init__(self, rec: Any, request_headers: Any, limit: int, body: bool = True) -> None:
        self.rec = rec
        self.request_headers = request_headers  # the originals, unmasked (a replay sends them)
        self.response_headers: Any = None
        self._req: list[Any] = []
        self.req_size = 0
        self.req_done = not body  # the request body was read to its end (True for none)
        self._resp: list[Any] = []
        self.resp_size = 0
        self.limit = limit
        self.done = False

    def request_chunk(self, chunk: Any) -> None:
        size = self.req_size
        if size < self.limit:
            self._req.append(_kept(chunk, self.limit - size))  # the preview is cut when shown
        self.req_size = size + len(chunk)

    def request_end(self) -> None:
        self.req_done = True

    def request_whole(self, body: Any) -> None:
        self._req = [body if len(body) <= self.limit else body[:self.limit]] if body else []
        self.req_size = len(body)
        self.req_done = True

    def response_chunk(self, chunk: Any) -> None:
        size = self.resp_size
        if size < self.limit:
            self._resp.append(_kept(chunk, self.limit - size))
        self.resp_size = size + len(chunk)

    def response_whole(self, body: Any) -> None:
        # Cut now: a whole body may be far over the preview (the ring keeps N of them).
        self._resp = [body if len(body) <= self.limit else body[:self.limit]] if body else []
        self.resp_size = len(body)

    def finish(self, response_headers: Any = None, body: Any = None) -> None:
        """The request ended: the response's headers (when not set yet) and its body when the
        response carried it whole (not streamed)."""
        if self.response_headers is None:
            self.response_headers = response_headers
        if body is not None and not self._resp and isinstance(body, (bytes, bytearray)):
            self.response_whole(body)
        self.done = True

    @property
    def request_truncated(self) -> bool:
        return self.req_size > self.limit or (self.done and not self.req_done)

    def request_body(self) -> bytes:
        return _body(self._req, self.limit) if self._req else b""

    def response_body(self) -> bytes:
        return _body(self._resp, self.limit) if self._resp else b""

    def entry(self, extra_mask: Iterable[str] = ()) -> dict[str, Any]:
        """What /admin/requests shows: secrets in headers and query masked."""
        rec = self.rec
        path, _, query = mask_query(rec.path).partition("?")
        request_headers = _pairs(self.request_headers)
        replay_of = next((v for k, v in request_headers if k.lower() == REPLAY_HEADER), "")
        req = self.request_body()
        resp = self.response_body()
        req_text, req_enc = _shown_body(req, self.req_size > len(req))
        resp_text, resp_enc = _shown_body(resp, self.resp_size > len(resp))
        return {
            "id": rec.request_id,
            "time": _stamp(rec.started),
            "method": rec.method,
            "host": rec.host,
            "path": path,
            "query": query,
            "status": int(rec.status),
            "duration": round(rec.duration if self.done else time.time() - rec.started, 6),
            "done": self.done,
            "request_headers": _masked(request_headers, extra_mask),
            "response_headers": _masked(_pairs(self.response_headers), extra_mask),
            "request_body": req_text,
            "request_body_encoding": req_enc,
            "request_size": self.req_size,
            "request_truncated": self.request_truncated,
            "response_body": resp_text,
            "response_body_encoding": resp_enc,
            "response_size": self.resp_size,
            "response_truncated": self.resp_size > self.limit,
            "group": rec.group,
            "client_id": rec.client_id,
            "error": rec.error,
            "replay_of": replay_of,
            "websocket": _websocket(request_headers),
        }

    def replay_spec(self) -> dict[str, Any]:
        """What sending this request again takes, unmasked: method, target, host, headers
        (hop-by-hop ones dropped), the body (base64). NotReplayable when its body was not
        captured whole, or it is a WebSocket."""
        pairs = _pairs(self.request_headers)
        if _websocket(pairs):
            raise NotReplayable("websocket", "a WebSocket's messages are not captured; it cannot be replayed")
        if self.req_size > self.limit:
            raise NotReplayable("body_not_captured", f"the request body ({self.req_size} bytes) is over the "
                                f"inspector's preview ({self.limit} bytes): only its start was kept")
        if not self.req_done:
            raise NotReplayable("body_not_captured", "the request body was not read to its end"
                                + ("" if self.done else " (the request is still running)"))
        rec = self.rec
        return {
            "id": rec.request_id, "method": rec.method, "host": rec.host, "target": rec.path,
            # Nor what the caller said of who forwarded it: the replay comes from loopback, which
            # trusted_proxies may trust, and would vouch for it.
            "headers": [[k, v] for k, v in pairs if k.lower() not in _HOP and not _forwarding(k)],
            "body": base64.b64encode(self.request_body()).decode(),
        }


def _forwarding(name: str) -> bool:
    lowered = name.lower()
    return lowered == "forwarded" or lowered.startswith("x-forwarded-")


def _websocket(pairs: list[tuple[str, str]]) -> bool:
    return any(k.lower() == "upgrade" and "websocket" in v.lower() for k, v in pairs)


def _masked(pairs: list[tuple[str, str]], extra: Iterable[str]) -> list[list[str]]:
    shown = mask_headers(pairs)
    extra = frozenset(extra)
    if extra:
        shown = [[k, MASK if v and k.lower() in extra else v] for k, v in shown]
    return shown


class Inspector:
    """The ring of one process (a gateway worker, a client): the last `size` requests."""

    def __init__(self, *, enabled: bool = True, size: int = 200, body_bytes: int = 65536,
                 mask: Iterable[str] = ()) -> None:
        self.enabled = enabled
        self.body_bytes = body_bytes
        self.mask = tuple(mask)
        self.ring: collections.deque[Capture] = collections.deque(maxlen=size)

    def configure(self, *, enabled: bool, size: int, body_bytes: int, mask: Iterable[str]) -> None:
        """New settings (a reload); the requests kept stay (the newest `size` of them)."""
        self.enabled = enabled
        self.body_bytes = body_bytes
        self.mask = tuple(mask)
        if size != self.ring.maxlen:
            self.ring = collections.deque(self.ring, maxlen=size)
        if not enabled:
            self.ring.clear()

    def open(self, rec: Any, request_headers: Any, body: bool = True, kind: type[Capture] = Capture) -> Capture | None:
        """A request starts (`body`: it has one): its capture, a `kind` (None when the inspector is off)."""
        if not self.enabled:
            return None
        cap = kind(rec, request_headers, self.body_bytes, body)
        self.ring.append(cap)
        return cap

    def find(self, request_id: str) -> Capture | None:
        for cap in reversed(self.ring):
            if cap.rec.request_id == request_id:
                return cap
        return None

    def entries(self, *, limit: int = 50, group: str | None = None, status: str | None = None,
                request_id: str | None = None) -> list[dict[str, Any]]:
        """Newest first, filtered; ValueError for a bad `status`."""
        test = status_filter(status) if status else None
        out = []
        for cap in reversed(self.ring):
            rec = cap.rec
            if request_id is not None and rec.request_id != request_id:
                continue
            if group is not None and rec.group != group:
                continue
            if test is not None and not test(rec.status, rec.error):
                continue
            out.append(cap.entry(self.mask))
            if len(out) >= limit:
                break
        return out


_PROCESS = Inspector()


def process_inspector() -> Inspector:
    """The ring of this process: a gateway worker's HTTP entry fills it, its router link
    answers the other workers' "requests" op from it."""
    return _PROCESS
