"""The PROXY protocol header (HAProxy's, versions 1 and 2) an L4 balancer puts
in front of a connection to say whose it is. Pure: `parse_header` reads the
bytes a connection started with; the listeners do the I/O.

v1 is one text line, `PROXY TCP4|TCP6|UNKNOWN ...\\r\\n`, at most 107 bytes.
v2 is a 12-byte signature, version/command, family/protocol, a 16-bit length
and that many bytes of addresses and TLVs (skipped). A LOCAL v2 header (the
balancer's own health check), UNKNOWN v1, and families other than TCP over
IPv4/IPv6 declare no source: the caller is the connection's own peer.
"""
from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

__all__ = ["ProxyHeaderError", "Parsed", "parse_header", "V1_MAX", "V2_SIGNATURE", "V2_MAX_LENGTH", "MAX_HEADER",
           "v1_header", "v2_header"]

V1_MAX = 107  # the spec's bound, CRLF included
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The spec allows 64 KiB of TLVs; balancers send a few hundred bytes at most, and
# every byte here is read before the caller is known, so the bound is ours.
V2_MAX_LENGTH = 2048
MAX_HEADER = 16 + V2_MAX_LENGTH

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header; the message says why."""


class Parsed(NamedTuple):
    source: Address | None  # the declared caller; None: LOCAL/UNKNOWN (the peer itself)
    length: int             # bytes of the header; what follows is the caller's


def parse_header(data: bytes) -> Parsed | None:
    """The header at the start of `data`, or None while it is incomplete (every
    byte of `data` is then header). Raises ProxyHeaderError as soon as the
    bytes cannot start a valid header."""
    if not data:
        return None
    if data[0] == V2_SIGNATURE[0]:
        return _v2(data)
    if data[0] == V1_PREFIX[0]:
        return _v1(data)
    raise ProxyHeaderError("no PROXY header (neither v1 nor v2)")


def _v1(data: bytes) -> Parsed | None:
    head = data[:len(V1_PREFIX)]
    if head != V1_PREFIX[:len(head)]:
        raise ProxyHeaderError("no PROXY header (neither v1 nor v2)")
    end = data.find(b"\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"v1 header without CRLF within {V1_MAX} bytes")
        return None
    if data[end - 1:end] != b"\r":
        raise ProxyHeaderError("v1 header line does not end with CRLF")
    line = data[len(V1_PREFIX):end - 1]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    parts = text.split(" ")
    if parts[0] == "UNKNOWN":  # the rest, if any, is to be ignored
        return Parsed(None, end + 1)
    if parts[0] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"v1 header with unknown protocol {parts[0][:8]!r}")
    if len(parts) != 5:
        raise ProxyHeaderError("v1 header needs: protocol, source, destination, source port, destination port")
    _, src, dst, sport, dport = parts
    version = 4 if parts[0] == "TCP4" else 6
    source = _v1_address(src, version)
    _v1_address(dst, version)
    port = _v1_port(sport)
    _v1_port(dport)
    return Parsed((source, port), end + 1)


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"v1 header with a bad address {text[:46]!r}") from None
    if address.version != version:
        raise ProxyHeaderError(f"v1 header: {text!r} is not an IPv{version} address")
    return str(address)


def _v1_port(text: str) -> int:
    # Decimal, no sign, no leading zero (the spec's form); int() alone would take "+80" or " 80".
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"v1 header with a bad port {text[:8]!r}")
    return int(text)


_FAMILIES = {0x11: (4, 12), 0x21: (16, 36)}  # TCP over IPv4 / IPv6: address bytes, block length


def _v2(data: bytes) -> Parsed | None:
    sig = data[:12]
    if sig != V2_SIGNATURE[:len(sig)]:
        raise ProxyHeaderError("v2 header with a wrong signature")
    if len(data) < 16:
        return None
    ver_cmd, family, length = data[12], data[13], struct.unpack_from("!H", data, 14)[0]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"v2 header with version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command > 1:
        raise ProxyHeaderError(f"v2 header with unknown command {command}")
    if length > V2_MAX_LENGTH:
        raise ProxyHeaderError(f"v2 header of {length} bytes (at most {V2_MAX_LENGTH})")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    if command == 0:  # LOCAL: the balancer's own connection; the block is skipped
        return Parsed(None, total)
    shape = _FAMILIES.get(family)
    if shape is None:  # UNSPEC, UNIX, datagrams: no TCP source to declare
        return Parsed(None, total)
    size, block = shape
    if length < block:
        raise ProxyHeaderError(f"v2 header: {length} address bytes, family needs {block}")
    source = str(ipaddress.ip_address(data[16:16 + size]))
    port = struct.unpack_from("!H", data, 16 + 2 * size)[0]
    return Parsed((source, port), total)  # TLVs after the block are skipped


def v1_header(source: Address, destination: Address) -> bytes:
    """A v1 header declaring `source` (for tests and tools)."""
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2_header(source: Address | None, destination: Address | None = None, tlvs: bytes = b"") -> bytes:
    """A v2 header: PROXY declaring `source`, or LOCAL when None (for tests and tools)."""
    if source is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    src = ipaddress.ip_address(source[0])
    if destination is None:
        destination = ("0.0.0.0" if src.version == 4 else "::", 0)
    dst = ipaddress.ip_address(destination[0])
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(block)) + block
