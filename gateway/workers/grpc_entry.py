"""The gRPC entry: any method, raw bytes (a generic handler), routed by
service name and metadata to a client group, carried through the tunnel.

Every call kind is served as a stream-stream call: on the wire unary and
streaming calls differ only in how many messages go each way. grpcio does not
show :authority to server handlers, so gRPC routes match the service (and
metadata), not the host.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from multidict import CIMultiDict

from gateway.http.entry import EntryLog
from gateway.http.grpc_bridge import (
    MESSAGE, TRAILERS, checked_metadata, decode_trailers, grpc_timeout, metadata_to_pairs, read_records,
    status_for, write_messages,
)
from gateway.http.response_head import check_response_head
from gateway.ids import RequestIds, trace_id_from
from gateway.observe import AccessLog, AccessRecord, RequestMetrics
from gateway.rules import first_match
from gateway.tunnel import frames
from gateway.tunnel.errors import TunnelError

if TYPE_CHECKING:
    from gateway.workers.routing import Routing

__all__ = ["GrpcEntry"]

log = logging.getLogger("gateway.grpc")


class GrpcEntry(grpc.GenericRpcHandler):
    def __init__(self, routing: "Routing", ids: RequestIds, *, access_log: AccessLog,
                 metrics: RequestMetrics) -> None:
        self.routing = routing
        self.book = EntryLog(ids, worker=str(routing.index), direction="grpc", access_log=access_log,
                             metrics=metrics, logger=log, failure="grpc call failed")

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method, metadata = details.method, details.invocation_metadata

        async def handler(requests: Any, context: grpc.aio.ServicerContext) -> None:
            await self._serve(method, metadata, requests, context)

        return grpc.stream_stream_rpc_method_handler(handler)

    async def _serve(self, method: str, metadata: Any, requests: Any, context: grpc.aio.ServicerContext) -> None:
        pairs = metadata_to_pairs(metadata)
        lookup = CIMultiDict(pairs)
        rec = self.book.record(trace_id=trace_id_from(lookup), method="GRPC", host="", path=method)
        with self.book.track(rec):
            code, details = await self._call(method, pairs, lookup, requests, context, rec)
            rec.status = 200 if code == grpc.StatusCode.OK else 502
            if code != grpc.StatusCode.OK:
                rec.error = rec.error or f"grpc_{code.name.lower()}"
            context.set_code(code)
            context.set_details(details)

    def _fail(self, rec: AccessRecord, error: TunnelError) -> tuple[grpc.StatusCode, str]:
        self.book.failed(rec, error.code, error.message)
        return status_for(error), f"{error.code}: {error.message} (request_id {rec.request_id})"

    async def _call(self, method: str, pairs: list[tuple[str, str]], lookup: CIMultiDict, requests: Any,
                    context: grpc.aio.ServicerContext, rec: AccessRecord) -> tuple[grpc.StatusCode, str]:
        cfg = self.routing.config
        rule = first_match(cfg.grpc_routes, "", method, "POST", lookup)
        if rule is None:
            return self._fail(rec, TunnelError("no_matching_rule", f"no gRPC route matches {method}"))
        rec.rule, rec.group = rule.name, rule.target
        spec = cfg.groups[rule.target]
        chosen = self.routing.choose(spec, authority="", path=method, method="POST", headers=lookup, key=None)
        if chosen is None:
            return self._fail(rec, TunnelError("no_client_available", f"no client of group {spec.name!r}"))
        stream, rec.client_id = chosen
        remaining = context.time_remaining()
        headers = [("content-type", "application/grpc"), *pairs, ("x-request-id", rec.request_id)]
        if remaining is not None:
            headers.append(("grpc-timeout", grpc_timeout(remaining)))
        head_timeout = min(remaining, rule.timeout) if remaining is not None else rule.timeout
        try:
            ex = stream.open_request(
                rec.request_id, rec.trace_id, method="POST", path=method, scheme="grpc", authority="",
                headers=headers, end_stream=False, timeout_ms=int(head_timeout * 1000), group=spec.name,
                target_client=rec.client_id,
                idle_timeout_ms=int((rule.idle_timeout or cfg.stream_idle_timeout) * 1000),
            )
        except TunnelError as exc:
            return self._fail(rec, exc)
        pump = asyncio.get_running_loop().create_task(write_messages(ex.sender, requests))
        try:
            await asyncio.wait([ex.head], timeout=head_timeout)
            if not ex.head.done():
                ex.close("timeout", "no response head in time")
                return self._fail(rec, TunnelError("timeout", f"no response within {head_timeout:g}s"))
            head = ex.head.result()
            checked = check_response_head(head.status, head.reason, frames.header_list(head))
            await context.send_initial_metadata(checked_metadata(checked.headers))
            async for kind, payload in read_records(ex.body, rule.idle_timeout or cfg.stream_idle_timeout):
                if kind == MESSAGE:
                    await context.write(payload)
                elif kind == TRAILERS:
                    code, details, trailing = decode_trailers(payload)
                    context.set_trailing_metadata(trailing)
                    return _status(code), details
            return self._fail(rec, TunnelError("protocol_error", "the call ended without trailers"))
        except TunnelError as exc:
            if exc.code == "bad_response":
                log.warning("bad response from tunnel client %s (group %s): %s", rec.client_id, spec.name,
                            exc.message, extra={"request_id": rec.request_id, "trace_id": rec.trace_id,
                                                "client_id": rec.client_id, "code": exc.code})
                ex.close(exc.code, exc.message)
            return self._fail(rec, exc)
        finally:
            if not pump.done():
                pump.cancel()
            ex.close()


def _status(number: int) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == number:
            return status
    return grpc.StatusCode.UNKNOWN
