"""Which tunnel streams this worker holds, by group and by connection. No I/O: `Routing` decides which one a request takes."""
from __future__ import annotations

from typing import Any, Hashable, Iterator

from gateway.tunnel.stream import TunnelStream

__all__ = ["stream_info", "StreamRegistry", "connection_key"]


def connection_key(group: str, client_id: str, connection: int, certificate: Hashable = None) -> tuple:
    """What one connection of one client is: its identity (group, client id and,
    with mTLS, the certificate's names) and its connection index. A client id
    alone names nothing: another group may use the same one."""
    return (group, client_id, certificate, connection)


class StreamRegistry:
    def __init__(self) -> None:
        self._by_group: dict[str, list[TunnelStream]] = {}
        self._by_key: dict[tuple, TunnelStream] = {}
        self._keys: dict[TunnelStream, tuple] = {}

    def add(self, stream: TunnelStream, key: tuple | None = None) -> TunnelStream | None:
        """Register `stream` under `key` (`connection_key`; default: its group and
        label); returns the older stream of the same key (same identity, same
        connection index), if any: only that one may be replaced."""
        key = key if key is not None else (stream.group, stream.label)
        self._by_group.setdefault(stream.group, []).append(stream)
        old = self._by_key.get(key)
        self._by_key[key] = stream
        self._keys[stream] = key
        if old is None or old is stream or old.draining:
            return None
        return old

    def remove(self, stream: TunnelStream) -> None:
        streams = self._by_group.get(stream.group)
        if streams and stream in streams:
            streams.remove(stream)
            if not streams:
                del self._by_group[stream.group]
        key = self._keys.pop(stream, None)
        if key is not None and self._by_key.get(key) is stream:
            del self._by_key[key]

    def count(self, group: str) -> int:
        """Streams of `group` this worker holds, draining ones included."""
        return len(self._by_group.get(group, ()))

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


def stream_info(s: TunnelStream, worker: int) -> dict[str, Any]:
    """A client stream as the shard table and the admin port show it."""
    return {
        "client_id": s.peer_id,
        "connection": s.label,
        "group": s.group,
        "certificate": list(getattr(s, "certificate", ())),  # with mTLS: part of the client's identity
        "instance": getattr(s, "instance", ""),  # the client process (tells its own moves from a duplicate)
        "worker": worker,
        "remote": getattr(s, "remote", ""),
        "connected_at": s.connected_at,
        "pending": len(s.pending),
        "serving": len(s.serving),
        "peer_inflight": s.peer_inflight,
        "requests_originated": s.requests_originated,
        "requests_served": s.requests_served,
        "unknown_frames": s.unknown_frames,
        "batches_out": s.batches_out,
        "frames_out": s.frames_out,
        "bytes_out": s.bytes_out,
        "draining": s.draining,
        "config_version": s.config_version,
        "config_refused": list(s.config_refused) if s.config_refused[0] else [],
        "unhealthy": sorted(s.peer_unhealthy),
    }
