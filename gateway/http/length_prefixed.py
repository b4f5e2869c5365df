"""Length-prefixed messages inside a body stream: [kind: 1 byte][length: 4][payload].

The framing of gRPC over HTTP/2 (kind 0 a message, 0x80 trailers, as in
gRPC-Web) and the one our WebSocket bridge uses (kind the opcode). It makes
messages independent of how DATA frames cut the body. Pure logic.
"""
from __future__ import annotations

import struct

from gateway.tunnel.errors import TunnelError

__all__ = ["encode", "Decoder", "HEADER_SIZE"]

_HEAD = struct.Struct("!BI")
HEADER_SIZE = _HEAD.size


def encode(kind: int, payload: bytes) -> bytes:
    return _HEAD.pack(kind, len(payload)) + payload


class Decoder:
    """Whole messages out of a stream of chunks."""

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        self._buf += chunk
        out = []
        while len(self._buf) >= HEADER_SIZE:
            kind, length = _HEAD.unpack_from(self._buf)
            if length > self.max_message:
                raise TunnelError("protocol_error", f"message of {length} bytes is over the limit")
            end = HEADER_SIZE + length
            if len(self._buf) < end:
                break
            out.append((kind, bytes(self._buf[HEADER_SIZE:end])))
            del self._buf[:end]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
