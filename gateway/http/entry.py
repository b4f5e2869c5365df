"""What every entry does around a request, whatever carries it: the access
record, counters, the error answer and its log line (`EntryLog`), and the
checks of an HTTP request's head and body. The gateway's public HTTP entry,
its gRPC entry and the client's local entry each compose these."""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

from gateway.history import History, process_history
from gateway.quick import label_of
from gateway.rollout.stats import process_rollout_stats
from gateway.http.connections import EntryLimits
from gateway.http.entry_server import EntryServer
from gateway.http.headers import end_to_end, forwarded, header_bytes, is_trusted
from gateway.http.relay import error_response, expectation
from gateway.ids import RequestIds
from gateway.observe import NO_METRICS, AccessLog, AccessRecord, RateWindow, RequestMetrics
from gateway.tunnel.errors import TunnelError

if TYPE_CHECKING:
    from gateway.tunnel.exchange import InboundExchange

__all__ = ["EntryLog", "ObservedExchange", "entry_server", "head_problem", "body_problem", "forward_headers"]

log = logging.getLogger("gateway.access")

_ANSWERED_HERE = frozenset({b"expect"})

Problem = tuple[str, str]  # (error code, message)

_serving: contextvars.ContextVar[web.BaseRequest | None] = contextvars.ContextVar("entry_request", default=None)


def entry_server(handler: Callable[[Any], Any], max_header_bytes: int, limits: EntryLimits,
                 on_drop: Callable[[str], None] | None = None) -> EntryServer:
    """The server of an entry (`entry_server.py`: every path is ours, no application,
    router or middlewares), calling `handler` for every request, its connections
    bounded by `limits` (`on_drop(reason)` counts those it closes)."""
    # The request being served is set for its access record (EntryLog.record): the entries
    # need not hand it down. Set in the request's own task, so it never leaks to another.
    return EntryServer(handler, limits=limits, max_header_bytes=max_header_bytes, on_drop=on_drop,
                       current=_serving)


class _Tracking:
    """The span of one request at an entry (see `EntryLog.track`)."""

    __slots__ = ("book", "rec", "t0")

    def __init__(self, book: "EntryLog", rec: AccessRecord) -> None:
        self.book = book
        self.rec = rec
        self.t0 = 0.0

    def __enter__(self) -> AccessRecord:
        self.book.requests += 1
        self.book.active += 1
        self.t0 = time.monotonic()
        return self.rec

    def __exit__(self, exc_type: Any, _exc: Any, _tb: Any) -> None:
        book, rec = self.book, self.rec
        book.active -= 1
        if exc_type is asyncio.CancelledError:
            # The caller went away; the exchange's RESET already went down the stream.
            rec.error = rec.error or "client_disconnected"
            rec.status = rec.status or 499
        rec.duration = time.monotonic() - self.t0
        book.access_log.write(rec)
        book.metrics.observe(rec)
        book.window.add(bool(rec.error) or rec.status >= 500)
        book.history.add(label_of(rec.group), rec.duration, rec.status >= 500)  # the status page's graphs
        rollouts = book.rollouts
        if rollouts.watching and rec.group in rollouts.watching and book.direction != "egress":
            rollouts.add(rec.group, rec.client_id, rec.status, rec.duration)  # a canary judged against the rest


class EntryLog:
    """An entry's request ids, counters, access log and metrics."""

    def __init__(self, ids: RequestIds, *, worker: str, direction: str, access_log: AccessLog | None = None,
                 metrics: RequestMetrics = NO_METRICS, logger: logging.Logger = log,
                 failure: str = "request failed", history: History | None = None) -> None:
        self.ids = ids
        # Where a failure is logged, and as what ("request failed: <code>").
        self.log = logger
        self.failure = failure
        self.worker = worker
        self.direction = direction
        self.access_log = access_log or AccessLog("off")
        self.metrics = metrics
        self.requests = 0
        self.active = 0
        self.errors: dict[str, int] = {}
        self.window = RateWindow()
        # The last 15 minutes by group (gateway/history.py); by default the process's own.
        self.history = history if history is not None else process_history()
        self.rollouts = process_rollout_stats()

    def record(self, *, trace_id: str, method: str, host: str, path: str) -> AccessRecord:
        """A new request's record, with a fresh request id, and the caller's address and
        User-Agent when an entry_server serves it."""
        rec = AccessRecord(request_id=self.ids.next(), trace_id=trace_id, method=method, host=host, path=path,
                           worker=self.worker, direction=self.direction)
        request = _serving.get()
        if request is not None:
            rec.remote = request.remote or ""
            rec.user_agent = request.headers.get("User-Agent", "")
        return rec

    def track(self, rec: AccessRecord) -> _Tracking:
        """`with book.track(rec):` around serving a request: counts it, and at
        its end (499 when the caller went away) logs it and observes it."""
        return _Tracking(self, rec)

    def failed(self, rec: AccessRecord, code: str, message: str) -> None:
        """Count and log a request that failed with `code`."""
        self.errors[code] = self.errors.get(code, 0) + 1
        rec.error = code
        self.log.info("%s: %s", self.failure, code, extra={"request_id": rec.request_id, "trace_id": rec.trace_id,
                                                    "code": code, "client_id": rec.client_id, "detail": message})

    def fail(self, rec: AccessRecord, code: str, message: str, *, status: int | None = None,
             retry_after: int | None = None) -> web.Response:
        """The JSON error answer of a failed HTTP request."""
        self.failed(rec, code, message)
        return error_response(code, message, request_id=rec.request_id, trace_id=rec.trace_id,
                              client_id=rec.client_id, status=status, retry_after=retry_after)

    def fail_with(self, rec: AccessRecord, error: TunnelError) -> web.Response:
        return self.fail(rec, error.code, error.message, retry_after=1 if error.status == 503 else None)


class ObservedExchange:
    """A request a peer sent up a tunnel (an InboundExchange), its answer noted on its
    access record as it goes: the status of the head sent, or of the RESET (and its
    code as the error). Everything else is the exchange's own."""

    __slots__ = ("_ex", "_rec")

    def __init__(self, ex: "InboundExchange", rec: AccessRecord) -> None:
        self._ex = ex
        self._rec = rec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ex, name)

    def respond(self, status: int, reason: str, headers: Any, *, end_stream: bool) -> None:
        self._rec.status = status
        self._ex.respond(status, reason, headers, end_stream=end_stream)

    def respond_head(self, head: Any) -> None:
        self._rec.status = head.status
        self._ex.respond_head(head)

    def reset(self, code: str, message: str = "") -> None:
        if not self._rec.status:  # before a head: what the caller gets instead
            self._rec.status = TunnelError(code, message).status
        self._rec.error = self._rec.error or code
        self._ex.reset(code, message)


def head_problem(request: web.BaseRequest, max_header: int) -> Problem | None:
    """Why the request head is refused (too large, an unknown Expect), or None."""
    if header_bytes(request.raw_headers) + len(request.raw_path) > max_header:
        return "headers_too_large", f"request head over {max_header} bytes"
    expect = expectation(request)
    if expect is not None and expect != "100-continue":  # the only expectation HTTP defines
        return "expectation_failed", f"unknown Expect: {request.headers['Expect']}"
    return None


def body_problem(request: web.BaseRequest, max_body: int) -> Problem | None:
    """A declared length over the limit; a chunked body is counted as it streams."""
    length = request.content_length
    if length is not None and length > max_body:
        return "body_too_large", f"request body is over {max_body} bytes"
    return None


def forward_headers(request: web.BaseRequest, trusted_proxies: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """The caller's end-to-end headers with X-Forwarded-* set (appended to
    when the caller is in `trusted_proxies`)."""
    # The entry answers Expect itself (100 Continue, or 417 in head_problem), so it goes no further.
    remote = request.remote or ""
    return forwarded(end_to_end(request.raw_headers, _ANSWERED_HERE), remote=remote, proto=request.scheme,
                     host=request.host, trusted=is_trusted(remote, trusted_proxies))
