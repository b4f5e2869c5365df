"""gRPC calls through a tunnel stream, both halves, without knowing their protobuf.

A call travels as an exchange: the head carries the method path (scheme
"grpc") and the request metadata (binary values base64, as on HTTP/2); a
caller's deadline travels as `grpc-timeout`. Messages are length-prefixed in
the bodies (kind 0), one by one, and the response ends with a trailers record
(kind 0x80, as in gRPC-Web) holding grpc-status, grpc-message and the
trailing metadata. Import only in a worker or client process (grpc).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import re
from typing import Any, Iterable, Sequence

import grpc
import grpc.aio

from gateway.http import length_prefixed
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.body import BodyReader, BodyWriter
from gateway.tunnel.exchange import InboundExchange

__all__ = ["MESSAGE", "TRAILERS", "metadata_to_pairs", "pairs_to_metadata", "encode_trailers", "decode_trailers",
           "grpc_timeout", "parse_grpc_timeout", "checked_metadata", "call_upstream_grpc", "MAX_MESSAGE", "status_for"]

log = logging.getLogger("gateway.grpc")

MESSAGE, TRAILERS = 0x00, 0x80
MAX_MESSAGE = 64 << 20
# Request metadata that belongs to the hop, not the call.
_HOP_KEYS = frozenset({"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "user-agent",
                       "host", "connection"})


def metadata_to_pairs(md: Iterable[Any]) -> list[tuple[str, str]]:
    out = []
    for item in md or ():
        key, value = item[0], item[1]
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        out.append((key, value))
    return out


def pairs_to_metadata(pairs: Iterable[tuple[str, str]]) -> tuple[tuple[str, Any], ...]:
    out = []
    for key, value in pairs:
        low = key.lower()
        if low in _HOP_KEYS or low.startswith(":") or low.startswith("x-forwarded-"):
            continue
        out.append((low, base64.b64decode(value) if low.endswith("-bin") else value))
    return tuple(out)


_METADATA_KEY = re.compile(r"[0-9a-z_.\-]+")
_METADATA_TEXT = re.compile(r"[\x20-\x7e]*")


def checked_metadata(pairs: Iterable[tuple[str, str]]) -> tuple[tuple[str, Any], ...]:
    """`pairs_to_metadata` of metadata a tunnel client sent: TunnelError("bad_response")
    for a key or value gRPC cannot carry (or a -bin value that is not base64)."""
    pairs = list(pairs)
    for key, value in pairs:
        low = key.lower()
        if not _METADATA_KEY.fullmatch(low) or (not low.endswith("-bin") and not _METADATA_TEXT.fullmatch(value)):
            raise TunnelError("bad_response", "the tunnel client sent metadata gRPC cannot carry")
    try:
        return pairs_to_metadata(pairs)
    except ValueError:  # binascii.Error
        raise TunnelError("bad_response", "the tunnel client sent a -bin metadata value that is not base64") from None


def encode_trailers(code: int, details: str, md: Iterable[Any]) -> bytes:
    lines = [f"grpc-status: {code}", f"grpc-message: {details}".replace("\r", " ").replace("\n", " ")]
    lines += [f"{k}: {v}" for k, v in metadata_to_pairs(md)]
    return "\r\n".join(lines).encode()


def decode_trailers(raw: bytes) -> tuple[int, str, tuple[tuple[str, Any], ...]]:
    """The trailers record a tunnel client sent (TunnelError("bad_response") when gRPC cannot carry them)."""
    code, details, pairs = 2, "", []
    for line in raw.decode(errors="replace").split("\r\n"):
        key, _, value = line.partition(": ")
        if key == "grpc-status":
            code = int(value) if value.isdigit() else 2
        elif key == "grpc-message":
            details = value
        elif key:
            pairs.append((key, value))
    return code, details, checked_metadata(pairs)


def grpc_timeout(seconds: float) -> str:
    return f"{max(1, int(seconds * 1000))}m"


def parse_grpc_timeout(value: str) -> float | None:
    units = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
    if len(value) >= 2 and value[:-1].isdigit() and value[-1] in units:
        return int(value[:-1]) * units[value[-1]]
    return None


def status_for(error: TunnelError) -> grpc.StatusCode:
    """The gRPC status a caller sees for a tunnel failure."""
    return {
        "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
        "no_matching_rule": grpc.StatusCode.UNIMPLEMENTED,
        "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "cancelled": grpc.StatusCode.CANCELLED,
    }.get(error.code, grpc.StatusCode.UNAVAILABLE)


async def write_messages(sender: BodyWriter, messages: Any) -> None:
    async for msg in messages:
        await sender.write(length_prefixed.encode(MESSAGE, msg))
    sender.end()


async def read_records(body: BodyReader, idle: float | None = None):
    """(kind, payload) records of a gRPC body, as they arrive."""
    decoder = length_prefixed.Decoder(MAX_MESSAGE)
    while (chunk := await body.read(idle)) is not None:
        for record in decoder.feed(chunk):
            yield record


async def call_upstream_grpc(ex: InboundExchange, channel: grpc.aio.Channel, headers: Sequence[tuple[str, str]],
                             path: str) -> bool:
    """Make the exchange's call on `channel` and stream everything back."""
    deadline = None
    for k, v in headers:
        if k.lower() == "grpc-timeout":
            deadline = parse_grpc_timeout(v)
    call = channel.stream_stream(path)(metadata=pairs_to_metadata(headers), timeout=deadline)

    async def requests() -> None:
        try:
            async for kind, payload in read_records(ex.body):
                if kind == MESSAGE:
                    await call.write(payload)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call ended first; its status says why

    pump = asyncio.get_running_loop().create_task(requests())
    responded = False
    relayed = 0
    try:
        try:
            initial = await call.initial_metadata()
            ex.respond(200, "", metadata_to_pairs(initial), end_stream=False)
            responded = True
            while (msg := await call.read()) is not grpc.aio.EOF:
                relayed += 1
                await ex.sender.write(length_prefixed.encode(MESSAGE, msg))
            code, details, trailing = await call.code(), await call.details(), await call.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            code, details, trailing = exc.code(), exc.details() or "", exc.trailing_metadata()
            if not responded:
                ex.respond(200, "", metadata_to_pairs(exc.initial_metadata()), end_stream=False)
        if code == grpc.StatusCode.UNAVAILABLE and not relayed:
            # Mostly the channel's own failure to reach the upstream, whose text
            # names the upstream's address: the log keeps it, the caller never sees it.
            log.warning("upstream grpc call %s unavailable: %s", path, details,
                        extra={"request_id": ex.request_id, "trace_id": ex.trace_id})
            details = f"the upstream is unavailable; the log has the detail under request_id {ex.request_id}"
        await ex.sender.write(length_prefixed.encode(TRAILERS, encode_trailers(code.value[0], details, trailing)))
        ex.sender.end()
        return code not in (grpc.StatusCode.UNAVAILABLE,)
    finally:
        if not pump.done():
            pump.cancel()
        if not call.done():
            call.cancel()  # the caller went away (RESET): so does the upstream call
