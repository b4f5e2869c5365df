"""Error codes users can see, their HTTP status, and the JSON error body."""
from __future__ import annotations

import orjson

__all__ = ["TunnelError", "TransportClosed", "STATUS", "error_body"]

# code -> HTTP status, as in the failure table of DESIGN.md.
STATUS: dict[str, int] = {
    "no_matching_rule": 404,
    "no_client_available": 503,
    "overloaded": 503,
    "timeout": 504,
    "tunnel_closed": 502,
    "upstream_unavailable": 502,
    "upstream_timeout": 504,
    "protocol_error": 502,
    "internal_error": 502,
    "headers_too_large": 431,
    "body_too_large": 413,
    "bad_request": 400,
    "bad_target": 400,
    "method_not_allowed": 405,
    "cancelled": 502,
    "tunnel_unavailable": 503,
    "rate_limited": 429,
    "expectation_failed": 417,
    "bad_response": 502,
}

MESSAGES: dict[str, str] = {
    "no_matching_rule": "no rule matches this request",
    "no_client_available": "no tunnel client of the group is connected",
    "overloaded": "the tunnel is at its limit; retry later",
    "timeout": "no response head within the rule's timeout",
    "tunnel_closed": "the tunnel carrying the request was lost",
    "upstream_unavailable": "the upstream refused or failed",
    "headers_too_large": "request headers are larger than allowed",
    "body_too_large": "request body is larger than allowed",
    "bad_response": "the tunnel client sent an invalid response",
}


class TunnelError(Exception):
    """A request failed with one of the codes in STATUS."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message or MESSAGES.get(code, code)

    @property
    def status(self) -> int:
        return STATUS.get(self.code, 502)


def error_body(code: str, message: str, *, request_id: str, trace_id: str, client_id: str = "") -> bytes:
    return orjson.dumps(
        {
            "error": code,
            "message": message,
            "request_id": request_id,
            "trace_id": trace_id,
            "client_id": client_id,
        }
    )


class TransportClosed(Exception):
    """The transport under a stream ended for a known reason other than the peer
    closing it: `reason` is the word the stream closes with and logs
    (`message_too_large`, `heartbeat_timeout`, `connection_lost`)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
