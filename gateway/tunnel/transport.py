"""The gRPC side of a tunnel: one raw-bytes bidirectional RPC, on both ends.

The message type is `Batch`, but the RPC is registered with no serializers so
frames stay bytes until `frames.decode_batch`; the writer joins pre-encoded
frames. Import this module only inside a worker or client process (grpc must
not be loaded in a parent that forks or spawns).
"""
from __future__ import annotations

from typing import Awaitable, Callable, Protocol

import grpc
import grpc.aio

from gateway.tunnel.errors import TransportClosed

__all__ = [
    "SERVICE",
    "CLIENT_MAX_MESSAGE",
    "CLIENT_KEEPALIVE_MS",
    "METHOD",
    "Transport",
    "ServerTransport",
    "ClientTransport",
    "grpc_options",
    "transport_closed",
    "tunnel_handler",
    "open_client_call",
]

SERVICE = "tunnel.v1.Tunnel"
# The client's channel: messages up to 16 MiB (room above the largest batch of
# frames), keepalive pings every 10 s.
CLIENT_MAX_MESSAGE = 16 << 20
CLIENT_KEEPALIVE_MS = 10_000
METHOD = f"/{SERVICE}/Connect"
# The tunnel server lets gRPC take messages up to this many times its limit and
# checks the limit itself: an oversize message is then named (message_too_large)
# where gRPC would end the call with a bare EOF that reads as "closed by peer".
SERVER_RECEIVE_SLACK = 2
# The tunnel server's gRPC keepalive waits this many keepalive intervals for a
# PING ack: the stream's own heartbeat (3 missed intervals) names a partition
# first (heartbeat_timeout), where gRPC's would end the call with a bare EOF.
SERVER_KEEPALIVE_PATIENCE = 4


class Transport(Protocol):
    """What a TunnelStream runs on. A transport may also offer `write_parts(parts, size)`: one
    message given in parts, written without joining them (h2_call.py, h2_server.py); the
    stream's writer uses it when there. And `write_now(parts, size) -> bool`: the same when
    it waits for nothing, else False and nothing written (a full batch leaves at once). And
    `read_batch()`: what `read` gives, but a big message maybe in the pieces it arrived in
    (`pieces.Pieces`); the stream's reader uses it when there."""

    async def read(self) -> bytes | None: ...
    async def write(self, raw: bytes) -> None: ...
    def peer(self) -> str: ...
    async def close(self) -> None: ...


def grpc_options(max_message_bytes: int, keepalive_ms: int, *, server: bool) -> list[tuple[str, int]]:
    """Channel/server options: message size to match our batches, and keepalive
    settings that find a dead peer without tripping "too many pings"."""
    opts = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes * (SERVER_RECEIVE_SLACK if server else 1)),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_ms * SERVER_KEEPALIVE_PATIENCE if server else max(1000, keepalive_ms // 2)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if not server:
        # Each connection its own TCP connection (grpc shares subchannels
        # between channels of a process by default), so the kernel spreads
        # them over workers and a reconnect can land on another worker.
        opts.append(("grpc.use_local_subchannel_pool", 1))
    if server:
        opts += [
            ("grpc.so_reuseport", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", max(1000, keepalive_ms // 2)),
            ("grpc.http2.min_ping_interval_without_data_ms", max(1000, keepalive_ms // 2)),
        ]
    return opts


def transport_closed(exc: BaseException) -> TransportClosed | None:
    """What a failed call means for the stream, when gRPC says: an oversize
    message, a keepalive that found the peer gone, a lost connection."""
    if not isinstance(exc, grpc.aio.AioRpcError):
        return None
    code, details = exc.code(), exc.details() or ""
    lowered = details.lower()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in lowered:
        return TransportClosed("message_too_large", details)
    if code == grpc.StatusCode.UNAVAILABLE:
        if "keepalive" in lowered or "ping timeout" in lowered:
            return TransportClosed("heartbeat_timeout", details)
        return TransportClosed("connection_lost", details)
    return None


def server_stopping(exc: BaseException) -> TransportClosed | None:
    """A read cut by this worker's own grpc server stopping (its shutdown): not a fault."""
    if type(exc).__name__ == "_ServerStoppedError":  # grpc.aio's, not exported
        return TransportClosed("gateway_stopping", "this gateway worker is shutting down")
    return None


class ServerTransport:
    """The gateway's end: the servicer context of one Connect call. A message
    over `max_message` bytes raises TransportClosed (message_too_large)."""

    __slots__ = ("_ctx", "_max")
    known_end = staticmethod(server_stopping)

    def __init__(self, ctx: grpc.aio.ServicerContext, max_message: int = 0) -> None:
        self._ctx = ctx
        self._max = max_message

    async def read(self) -> bytes | None:
        msg = await self._ctx.read()
        if msg is grpc.aio.EOF:
            return None
        if self._max and len(msg) > self._max:
            # The peer reads what gRPC's own limit would have told it.
            detail = f"Received message larger than max ({len(msg)} vs. {self._max})"
            self._ctx.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            self._ctx.set_details(detail)
            raise TransportClosed("message_too_large", detail)
        return msg

    async def write(self, raw: bytes) -> None:
        await self._ctx.write(raw)

    def peer(self) -> str:
        return self._ctx.peer()

    def auth_context(self) -> dict:
        return self._ctx.auth_context()

    def refuse(self, details: str) -> None:
        """End the call, when the servicer returns, with RESOURCE_EXHAUSTED: a
        connection tunnel admission turns away, before or instead of a WELCOME."""
        self._ctx.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        self._ctx.set_details(details)

    async def close(self) -> None:
        # The call ends when the servicer coroutine returns.
        return None


class ClientTransport:
    """The client's end: a stream-stream call on a channel."""

    __slots__ = ("_call", "_target")

    def __init__(self, call: grpc.aio.StreamStreamCall, target: str) -> None:
        self._call = call
        self._target = target

    async def read(self) -> bytes | None:
        msg = await self._call.read()
        if msg is grpc.aio.EOF:
            return None
        return msg

    # Why a read failed (the stream logs it as its close reason); the call's own
    # error is what `read` raises, for the handshake that catches AioRpcError.
    known_end = staticmethod(transport_closed)

    async def write(self, raw: bytes) -> None:
        await self._call.write(raw)

    def peer(self) -> str:
        return self._target

    async def close(self) -> None:
        self._call.cancel()


def tunnel_handler(serve: Callable[[ServerTransport], Awaitable[None]],
                   max_message: int = 0) -> grpc.GenericRpcHandler:
    """A generic handler that runs `serve` for each Connect call (messages of
    at most `max_message` bytes, when given: see SERVER_RECEIVE_SLACK)."""

    async def connect(_request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await serve(ServerTransport(context, max_message))

    # grpc.aio calls a coroutine (non-generator) stream handler with
    # (request_iterator, context); reading through context.read() is allowed.
    handler = grpc.stream_stream_rpc_method_handler(connect)
    return grpc.method_handlers_generic_handler(SERVICE, {"Connect": handler})


def open_client_call(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.aio.StreamStreamCall:
    return channel.stream_stream(METHOD)(metadata=metadata)
