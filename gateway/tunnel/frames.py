"""The one place that builds and parses tunnel frames.

A batch on the wire is a serialized `Batch` message. Since `Batch` holds only
`repeated Frame frames = 1`, a batch is the concatenation of each frame encoded
as field 1 (tag 0x0a, varint length, bytes). The writer therefore keeps frames
serialized and joins them, without building a `Batch` object per send.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from google.protobuf.message import DecodeError

from gateway.tunnel import tunnel_pb2 as pb

__all__ = [
    "Frame",
    "Header",
    "ProtocolError",
    "decode_batch",
    "encode_frame",
    "join_batch",
    "request_head",
    "response_head",
    "data",
    "reset",
    "window",
    "ping",
    "goaway",
    "hello",
    "welcome",
    "config",
    "headers_to_pairs",
]

Frame = pb.Frame
Header = pb.Header


class ProtocolError(Exception):
    """The peer sent something that is not a valid batch of frames."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_frame(frame: pb.Frame) -> bytes:
    """Serialize one frame as an element of `Batch.frames`."""
    body = frame.SerializeToString()
    return b"\x0a" + _varint(len(body)) + body


def join_batch(encoded: Iterable[bytes]) -> bytes:
    return b"".join(encoded)


def decode_batch(raw: bytes) -> Sequence[pb.Frame]:
    try:
        return pb.Batch.FromString(raw).frames
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ProtocolError(f"malformed batch: {exc}") from None


def _pairs(headers: Iterable[tuple[str, str]]) -> list[pb.Header]:
    return [pb.Header(name=n, value=v) for n, v in headers]


def headers_to_pairs(headers: Iterable[pb.Header]) -> list[tuple[str, str]]:
    return [(h.name, h.value) for h in headers]


def request_head(
    request_id: str,
    trace_id: str,
    *,
    method: str,
    path: str,
    scheme: str,
    authority: str,
    headers: Iterable[tuple[str, str]],
    end_stream: bool,
    timeout_ms: int,
    group: str = "",
    target_client: str = "",
    idle_timeout_ms: int = 0,
) -> pb.Frame:
    return pb.Frame(
        request_id=request_id,
        trace_id=trace_id,
        headers=pb.Headers(
            method=method,
            path=path,
            scheme=scheme,
            authority=authority,
            headers=_pairs(headers),
            end_stream=end_stream,
            timeout_ms=timeout_ms,
            group=group,
            target_client=target_client,
            idle_timeout_ms=idle_timeout_ms,
        ),
    )


def response_head(
    request_id: str,
    trace_id: str,
    *,
    status: int,
    reason: str,
    headers: Iterable[tuple[str, str]],
    end_stream: bool,
) -> pb.Frame:
    return pb.Frame(
        request_id=request_id,
        trace_id=trace_id,
        reply=True,
        headers=pb.Headers(
            status=status, reason=reason, headers=_pairs(headers), end_stream=end_stream
        ),
    )


def data(request_id: str, trace_id: str, chunk: bytes, *, end_stream: bool, reply: bool) -> pb.Frame:
    return pb.Frame(
        request_id=request_id,
        trace_id=trace_id,
        reply=reply,
        data=pb.Data(data=chunk, end_stream=end_stream),
    )


def reset(request_id: str, trace_id: str, code: str, message: str, *, reply: bool) -> pb.Frame:
    return pb.Frame(
        request_id=request_id,
        trace_id=trace_id,
        reply=reply,
        reset=pb.Reset(code=code, message=message),
    )


def window(request_id: str, trace_id: str, increment: int, *, reply: bool) -> pb.Frame:
    return pb.Frame(
        request_id=request_id,
        trace_id=trace_id,
        reply=reply,
        window=pb.Window(increment=increment),
    )


def ping(nonce: int, *, ack: bool, inflight: int, unhealthy: Sequence[str] | None = None) -> pb.Frame:
    return pb.Frame(ping=pb.Ping(nonce=nonce, ack=ack, inflight=inflight, unhealthy_upstreams=unhealthy or (),
                                 health_report=unhealthy is not None))


def goaway(reason: str) -> pb.Frame:
    return pb.Frame(goaway=pb.GoAway(reason=reason))


def hello(
    *, client_id: str, group: str, token: str, version: str, capabilities: Sequence[str], connection_index: int
) -> pb.Frame:
    return pb.Frame(
        hello=pb.Hello(
            client_id=client_id,
            group=group,
            token=token,
            version=version,
            capabilities=list(capabilities),
            connection_index=connection_index,
        )
    )


def welcome(
    *,
    accepted: bool,
    code: str = "",
    message: str = "",
    config_version: str = "",
    config_json: bytes = b"",
    heartbeat_ms: int = 0,
    worker: str = "",
    window: int = 0,
    chunk_size: int = 0,
) -> pb.Frame:
    return pb.Frame(
        welcome=pb.Welcome(
            accepted=accepted,
            code=code,
            message=message,
            config_version=config_version,
            config_json=config_json,
            heartbeat_ms=heartbeat_ms,
            worker=worker,
            window=window,
            chunk_size=chunk_size,
        )
    )


def config(config_version: str, config_json: bytes, error: str = "") -> pb.Frame:
    return pb.Frame(config=pb.Config(config_version=config_version, config_json=config_json, error=error))
