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

__all__ = [
    "SERVICE",
    "CLIENT_MAX_MESSAGE",
    "CLIENT_KEEPALIVE_MS",
    "METHOD",
    "Transport",
    "ServerTransport",
    "ClientTransport",
    "grpc_options",
    "tunnel_handler",
    "open_client_call",
]

SERVICE = "tunnel.v1.Tunnel"
# The client's channel: messages up to 16 MiB (room above the largest batch of
# frames), keepalive pings every 10 s.
CLIENT_MAX_MESSAGE = 16 << 20
CLIENT_KEEPALIVE_MS = 10_000
METHOD = f"/{SERVICE}/Connect"


class Transport(Protocol):
    async def read(self) -> bytes | None: ...
    async def write(self, raw: bytes) -> None: ...
    def peer(self) -> str: ...
    async def close(self) -> None: ...


def grpc_options(max_message_bytes: int, keepalive_ms: int, *, server: bool) -> list[tuple[str, int]]:
    """Channel/server options: message size to match our batches, and keepalive
    settings that find a dead peer without tripping "too many pings"."""
    opts = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", max(1000, keepalive_ms // 2)),
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


class ServerTransport:
    """The gateway's end: the servicer context of one Connect call."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: grpc.aio.ServicerContext) -> None:
        self._ctx = ctx

    async def read(self) -> bytes | None:
        msg = await self._ctx.read()
        if msg is grpc.aio.EOF:
            return None
        return msg

    async def write(self, raw: bytes) -> None:
        await self._ctx.write(raw)

    def peer(self) -> str:
        return self._ctx.peer()

    def auth_context(self) -> dict:
        return self._ctx.auth_context()

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

    async def write(self, raw: bytes) -> None:
        await self._call.write(raw)

    def peer(self) -> str:
        return self._target

    async def close(self) -> None:
        self._call.cancel()


def tunnel_handler(serve: Callable[[ServerTransport], Awaitable[None]]) -> grpc.GenericRpcHandler:
    """A generic handler that runs `serve` for each Connect call."""

    async def connect(_request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await serve(ServerTransport(context))

    # grpc.aio calls a coroutine (non-generator) stream handler with
    # (request_iterator, context); reading through context.read() is allowed.
    handler = grpc.stream_stream_rpc_method_handler(connect)
    return grpc.method_handlers_generic_handler(SERVICE, {"Connect": handler})


def open_client_call(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.aio.StreamStreamCall:
    return channel.stream_stream(METHOD)(metadata=metadata)
