"""The serving side of HTTP over a tunnel stream, used by both programs: a
request that arrived on a stream is made to an upstream (the client for
ingress, the gateway for egress) and its response streams back."""
from __future__ import annotations

import logging

import aiohttp

from gateway.http.headers import end_to_end, has_body_response
from gateway.http.upstream_connection import BODY_WAIT, BodyLengthError, declared_body, declared_length
from gateway.http.upstream_pool import HttpPool, UpstreamError, UpstreamTimeout
from gateway.http.websocket import MAX_MESSAGE, bridge_upstream
from gateway.tunnel.exchange import InboundExchange

__all__ = ["call_upstream", "refuse_bad_request", "upstream_session", "UpstreamClients"]

log = logging.getLogger("gateway.proxy")


def upstream_session(*, connect_timeout: float = 5.0, limit: int = 0) -> aiohttp.ClientSession:
    """One pooled session that changes nothing it carries (WebSockets, health checks)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ttl_dns_cache=60, enable_cleanup_closed=True),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class UpstreamClients:
    """What the serving side calls upstreams with: the lean pool for HTTP
    requests, aiohttp for WebSocket upgrades and health checks."""

    def __init__(self, *, connect_timeout: float = 5.0) -> None:
        self.session = upstream_session(connect_timeout=connect_timeout)
        self.http = HttpPool(connect_timeout=connect_timeout)

    async def close(self) -> None:
        await self.http.close()
        await self.session.close()


def refuse_bad_request(ex: InboundExchange, problem: str) -> None:
    """Refuse a request the peer got wrong: a RESET bad_request (400) and a log line naming the peer."""
    stream = ex.stream
    log.warning("bad request from peer %s (group %s): %s", stream.peer_id, stream.group or "-", problem,
                extra={"request_id": ex.request_id, "trace_id": ex.trace_id, "client_id": stream.peer_id,
                       "code": "bad_request"})
    ex.reset("bad_request", problem)


async def call_upstream(
    ex: InboundExchange,
    clients: UpstreamClients,
    server: str,
    *,
    headers: list[tuple[str, str]],
    path: str,
    timeout: float,
    idle_timeout: float = 0.0,
    head_timeout: float | None = None,
) -> bool:
    """Make the exchange's request to `server` and stream the response back.
    `head_timeout` bounds the wait for the response head here (a rule of this
    end stricter than what the originator enforces); past it, a `timeout` RESET.
    False when the upstream failed (refused, broke, timed out): passive health."""
    if ex.head.scheme in ("ws", "wss"):
        scheme = "wss" if server.startswith("https:") else "ws"
        url = scheme + server[server.index(":"):] + path
        return await bridge_upstream(ex, clients.session, url, headers, timeout, MAX_MESSAGE)
    method = ex.head.method
    # The originator enforces its head timeout (its RESET cancels this call);
    # here only silence is bounded, so long streams may go on.
    try:
        length = declared_length(headers)
        if length is None:
            body = None if ex.body.at_eof else ex.body.iter_chunks()
        else:
            # Also at the end of the body: a length it does not have must fail, not wait.
            body = None if ex.body.at_eof and not length else declared_body(ex.body.iter_chunks(), length)
        try:
            resp = await clients.http.request(server, method, path, headers, body,
                                              read_timeout=max(timeout, idle_timeout), head_timeout=head_timeout)
        except UpstreamTimeout as exc:
            # The log has the upstream's address; the caller's answer never does.
            log.warning("upstream %s: %s", server, exc, extra={"request_id": ex.request_id, "trace_id": ex.trace_id})
            ex.reset("timeout", "the upstream did not answer in time")
            return False
        try:
            with_body = has_body_response(method, resp.status)
            if with_body and resp.body_follows:
                # Head and body then go on in one message; never long (the head timeout runs on).
                await resp.wait_body(min(BODY_WAIT, timeout / 4))
            ex.respond(resp.status, resp.reason, end_to_end(resp.raw_headers, response=True),
                       end_stream=not with_body)
            if with_body:
                while (chunk := await resp.read()) is not None:
                    # The last chunk carries the end of the body: one frame fewer.
                    await ex.sender.write(chunk, end=resp.at_end)
                ex.sender.end()
        finally:
            resp.release()
        return True
    except BodyLengthError as exc:
        refuse_bad_request(ex, str(exc))
        return True  # the peer's doing: no mark against the upstream's health
    except (UpstreamError, ValueError) as exc:
        log.warning(
            "upstream %s failed: %s", server, exc or type(exc).__name__,
            extra={"request_id": ex.request_id, "trace_id": ex.trace_id},
        )
        ex.reset("upstream_unavailable", f"the upstream refused or failed ({type(exc).__name__}); "
                                         f"the log has the detail under request_id {ex.request_id}")
        return False
