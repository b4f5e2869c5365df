"""A big tunnel message that arrived in several reads, kept as the reads' bytes
rather than joined, and its frames decoded from them.

Joining a 1 MiB batch costs a copy of every body byte in it; decoded in place,
a DATA frame's payload becomes views of the reads' bytes (one DataFrame a read
it spans; a piece that would keep much more than itself alive is copied:
`frames.payload_view`), so a body goes from the tunnel's socket to the
upstream's without a copy in Python. Only a frame's first bytes and its last
few are copied, to read its fields; a frame not laid out as our encoders write
it is joined and goes through `frames.decode_frame` (protobuf), so what
protobuf accepts stays the rule. Many small reads are joined, not kept
(`message_of`)."""
from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from typing import Iterator

from gateway.tunnel import frames

__all__ = ["Pieces", "JOIN_UNDER", "decode_message", "message_of"]

# A message under this many bytes is joined (one small copy is cheaper than the
# bookkeeping); a bigger one is kept in pieces.
JOIN_UNDER = 1 << 16
# A DATA frame's fields before its payload take at most this many bytes (two ids
# under 128 bytes each, the reply flag, two tags and two length varints).
_FIELDS_MAX = 300
# The fields after its payload (end_stream) at most this many.
_TAIL_MAX = 11


class Pieces:
    """A message as the (bytes, start, stop) spans it arrived in, in order."""

    __slots__ = ("spans", "size", "_ends")

    def __init__(self, spans: list[tuple[bytes, int, int]]) -> None:
        self.spans = spans
        self._ends = list(accumulate(stop - start for _, start, stop in spans))  # each span's end, in the message
        self.size = self._ends[-1] if spans else 0

    def __len__(self) -> int:
        return self.size

    def joined(self) -> bytes:
        return _join(self.spans)

    def _within(self, a: int, b: int) -> Iterator[tuple[bytes, int, int]]:
        """The message's bytes [a, b) as (buffer, start, stop) of the spans they are in."""
        i = bisect_right(self._ends, a)
        spans, ends = self.spans, self._ends
        while i < len(spans) and a < b:
            buf, start, stop = spans[i]
            lo = start + a - (ends[i] - (stop - start))
            hi = min(stop, lo + b - a)
            yield buf, lo, hi
            a += hi - lo
            i += 1

    def copy(self, a: int, b: int) -> bytes:
        """The message's bytes [a, b), copied (a few, to be read)."""
        return b"".join(memoryview(buf)[lo:hi] for buf, lo, hi in self._within(a, b))

    def payload(self, a: int, b: int) -> list[bytes | memoryview]:
        """The message's bytes [a, b), a piece a span: each a view or a copy (`frames.payload_view`)."""
        return [frames.payload_view(buf, lo, hi) for buf, lo, hi in self._within(a, b)]


def message_of(spans: list[tuple[bytes, int, int]]) -> bytes | Pieces:
    """A message that arrived in `spans`: kept in them when big and in spans of VIEW_OVER bytes
    on average at least, else joined (many small reads would make many small views, and as
    many DataFrames; a small message is cheaper joined)."""
    size = sum(stop - start for _, start, stop in spans)
    if size >= JOIN_UNDER and len(spans) * frames.VIEW_OVER <= size:
        return Pieces(spans)
    return _join(spans)


def _join(spans: list[tuple[bytes, int, int]]) -> bytes:
    return b"".join(buf if stop - start == len(buf) else memoryview(buf)[start:stop] for buf, start, stop in spans)


def decode_message(raw: bytes | Pieces) -> list[frames.Frame | frames.DataFrame]:
    """`frames.decode_frames` for a message whole or in pieces; raises frames.ProtocolError."""
    if type(raw) is not Pieces:
        return frames.decode_frames(raw)
    try:
        return _decode_pieces(raw)
    except frames.DECODE_ERRORS as exc:
        raise frames.ProtocolError(f"malformed batch: {exc}") from None


def _decode_pieces(p: Pieces) -> list[frames.Frame | frames.DataFrame]:
    out: list[frames.Frame | frames.DataFrame] = []
    spans = p.spans
    i = base = 0  # the span that holds pos, and the message's offset of its first byte
    pos, size = 0, p.size
    while pos < size:
        buf, start, stop = spans[i]
        while pos >= base + stop - start:
            base += stop - start
            i += 1
            buf, start, stop = spans[i]
        at = start + pos - base
        if stop - at >= 6:
            head, at0, limit = buf, at, stop
        else:  # the frame's tag and length may cross into the next span
            head, at0, limit = p.copy(pos, min(pos + 6, size)), 0, min(6, size - pos)
        if head[at0] != 0x0A:  # not Batch.frames: protobuf judges the whole batch
            return frames.decode_frames(p.joined())
        n, after = frames._read_length(head, at0 + 1, limit)
        first = pos + after - at0  # the frame's first byte, in the message
        end = first + n
        if end > size:
            raise frames.ProtocolError("malformed batch: frame runs past the end")
        if end - base <= stop - start:  # within this span
            local = start + first - base
            out.append(frames.decode_frame(buf, local, local + n))
        else:
            split = _split_data(p, first, end)
            if split is None:
                out.append(frames.decode_frame(p.copy(first, end), 0, n))
            else:
                out.extend(split)
        pos = end
    return out


def _split_data(p: Pieces, a: int, b: int) -> list[frames.DataFrame] | None:
    """The DATA frame at the message's [a, b), across spans, its payload as views (one
    DataFrame a span, the last with the frame's end_stream); None when it is not laid
    out as our encoders write it."""
    head = p.copy(a, min(b, a + _FIELDS_MAX))
    try:
        fields = frames.data_fields(head, 0, b - a)
    except IndexError:  # the frame's first bytes are not what our encoders write
        return None
    if fields is None:
        return None
    rid0, rid1, tr0, tr1, reply, start, n = fields
    tail_at = a + start + n
    if b - tail_at > _TAIL_MAX:
        return None
    end_stream = frames.data_end(p.copy(tail_at, b), 0, b - tail_at)
    if end_stream is None:
        return None
    rid, trace = head[rid0:rid1].decode(), head[tr0:tr1].decode()
    chunks = p.payload(a + start, tail_at) if n > frames.VIEW_OVER else [p.copy(a + start, tail_at)]
    out = [frames.DataFrame(rid, trace, reply != 0, chunk, False) for chunk in chunks]
    out[-1].end_stream = end_stream
    return out
