"""Which tunnel streams this worker holds, by group and by connection. No I/O: `Routing` decides which one a request takes."""
from __future__ import annotations

from typing import Iterator

from gateway.tunnel.stream import TunnelStream

__all__ = ["StreamRegistry"]


class StreamRegistry:
    def __init__(self) -> None:
        self._by_group: dict[str, list[TunnelStream]] = {}
        self._by_client: dict[str, TunnelStream] = {}

    def add(self, stream: TunnelStream) -> TunnelStream | None:
        """Register `stream`; returns the older stream of the same client id, if any."""
        self._by_group.setdefault(stream.group, []).append(stream)
        old = self._by_client.get(stream.label)
        self._by_client[stream.label] = stream
        if old is None or old is stream or old.draining:
            return None
        return old

    def remove(self, stream: TunnelStream) -> None:
        streams = self._by_group.get(stream.group)
        if streams and stream in streams:
            streams.remove(stream)
            if not streams:
                del self._by_group[stream.group]
        if self._by_client.get(stream.label) is stream:
            del self._by_client[stream.label]

    def usable(self, group: str) -> list[TunnelStream]:
        """Streams of `group` that take new requests."""
        return [s for s in self._by_group.get(group, ()) if not s.draining and not s.closed]

    def __iter__(self) -> Iterator[TunnelStream]:
        for streams in self._by_group.values():
            yield from streams

    def groups(self) -> dict[str, int]:
        """Usable (not draining) streams by group."""
        out = {}
        for g, streams in self._by_group.items():
            n = sum(1 for s in streams if not s.draining and not s.closed)
            if n:
                out[g] = n
        return out
