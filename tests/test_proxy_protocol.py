"""The PROXY protocol header parser (gateway/proxy_protocol.py): v1 and v2,
what declares a source and what does not, and every way a header is refused."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.proxy_protocol import (MAX_HEADER, V1_MAX, V2_MAX_LENGTH, V2_SIGNATURE, Parsed, ProxyHeaderError,
                                    parse_header, v1_header, v2_header)

REST = b"GET / HTTP/1.1\r\n\r\n"


@pytest.mark.parametrize("header, source", [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n", ("203.0.113.7", 51234)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 8001\r\n", ("2001:db8::7", 65535)),
    (b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n", ("0.0.0.0", 0)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),  # UNKNOWN: the rest is ignored
])
def test_v1(header, source):
    assert parse_header(header + REST) == Parsed(source, len(header))
    # Every proper prefix is incomplete, not an error: the rest may be on its way.
    for cut in range(1, len(header)):
        assert parse_header(header[:cut]) is None


def test_v1_longest_header_fits():
    header = v1_header(("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                       ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535))
    assert len(header) == V1_MAX - 3  # the spec's 107 is a bound, with room to spare
    assert parse_header(header).source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)


@pytest.mark.parametrize("header, why", [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n", "needs"),
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443 9\r\n", "needs"),
    (b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n", "IPv4"),
    (b"PROXY TCP6 203.0.113.7 2001:db8::1 1 2\r\n", "IPv6"),
    (b"PROXY TCP4 203.0.113.777 10.0.0.1 1 2\r\n", "bad address"),
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 2\r\n", "bad port"),
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 080 2\r\n", "bad port"),
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 +80 2\r\n", "bad port"),
    (b"PROXY TCP4  203.0.113.7 10.0.0.1 1 2\r\n", "needs"),
    (b"PROXY UDP4 203.0.113.7 10.0.0.1 1 2\r\n", "unknown protocol"),
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\n", "CRLF"),
    (b"PROXY TCP4 \xff.0.113.7 10.0.0.1 1 2\r\n", "ASCII"),
    (b"PROXY " + b"A" * 200, "within 107"),
    (b"PROXY UNKNOWN" + b" " * 100 + b"\r\n", "within 107"),
    (b"PROXX TCP4", "neither"),
    (b"GET / HTTP/1.1\r\n\r\n", "neither"),
    (b"\x16\x03\x01\x02\x00", "neither"),  # a TLS ClientHello where the header should be
])
def test_v1_refused(header, why):
    with pytest.raises(ProxyHeaderError, match=why):
        parse_header(header)


def _tlvs() -> bytes:
    # PP2_TYPE_AUTHORITY and an AWS-like vendor TLV: skipped.
    return b"\x02" + struct.pack("!H", 11) + b"example.com" + b"\xea" + struct.pack("!H", 4) + b"vpce"


@pytest.mark.parametrize("source", [("203.0.113.7", 51234), ("2001:db8::7", 443)])
@pytest.mark.parametrize("tlvs", [b"", _tlvs()])
def test_v2_proxy(source, tlvs):
    header = v2_header(source, tlvs=tlvs)
    assert parse_header(header + REST) == Parsed(source, len(header))
    for cut in range(1, len(header)):
        assert parse_header(header[:cut]) is None


def test_v2_local_and_unsupported_families_declare_no_source():
    local = v2_header(None, tlvs=_tlvs())
    assert parse_header(local + REST) == Parsed(None, len(local))
    # LOCAL with an address block: the block is skipped too.
    local_inet = V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x11, 12) + bytes(12)
    assert parse_header(local_inet) == Parsed(None, len(local_inet))
    for family, block in ((0x00, b""), (0x31, bytes(216)), (0x12, bytes(12))):  # UNSPEC, UNIX, UDP over IPv4
        header = V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(block)) + block
        assert parse_header(header) == Parsed(None, len(header))


@pytest.mark.parametrize("header, why", [
    (b"\r\n\r\n\x00\r\nQUIT\r", "signature"),
    (b"\r\n\r\n\x01", "signature"),
    (b"\r\nGET", "signature"),
    (V2_SIGNATURE + struct.pack("!BBH", 0x11, 0x11, 12) + bytes(12), "version 1"),
    (V2_SIGNATURE + struct.pack("!BBH", 0x22, 0x11, 12) + bytes(12), "command 2"),
    (V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, V2_MAX_LENGTH + 1), "at most"),
    (V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 0xFFFF), "at most"),
    (V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 8) + bytes(8), "needs 12"),
    (V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x21, 12) + bytes(12), "needs 36"),
])
def test_v2_refused(header, why):
    with pytest.raises(ProxyHeaderError, match=why):
        parse_header(header)


def test_v2_truncated_is_incomplete_and_oversize_is_refused_early():
    header = v2_header(("203.0.113.7", 1), tlvs=bytes(100))
    assert parse_header(header[:-1]) is None
    # The length is refused from the 16 bytes that carry it, before the body is read.
    with pytest.raises(ProxyHeaderError):
        parse_header(V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, V2_MAX_LENGTH + 1))


def test_empty_is_incomplete():
    assert parse_header(b"") is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_bytes(data):
    """Any bytes: a header within the bounds, incomplete (never past MAX_HEADER), or a ProxyHeaderError."""
    try:
        parsed = parse_header(data)
    except ProxyHeaderError:
        return
    if parsed is None:
        assert len(data) < MAX_HEADER
    else:
        assert 0 < parsed.length <= min(len(data), MAX_HEADER)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([v1_header(("203.0.113.7", 80), ("10.0.0.1", 443)),
                        v2_header(("203.0.113.7", 80), tlvs=_tlvs()), v2_header(None)]),
       st.integers(min_value=0, max_value=120), st.binary(min_size=1, max_size=4))
def test_fuzz_mutated_headers(header, at, noise):
    """A valid header with bytes overwritten: parsed to the same bounds or refused, never past its data."""
    at = min(at, len(header) - 1)
    data = header[:at] + noise + header[at + len(noise):]
    try:
        parsed = parse_header(data)
    except ProxyHeaderError:
        return
    assert parsed is None or parsed.length <= len(data)


# -- the listener and the relay (gateway/workers/proxied.py), in process -------------------------


async def _relay_round_trip() -> None:
    import asyncio
    import os

    from gateway.workers.proxied import ProxiedServer, Relay, bind_sockets

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Stands for the grpc server: echoes, and says whom it sees (the relay's local address).
        host, port = writer.get_extra_info("peername")[:2]
        writer.write(f"ipv4:{host}:{port}\n".encode())
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    inner = await asyncio.start_server(echo, "127.0.0.1", 0)
    relay = Relay(("127.0.0.1", inner.sockets[0].getsockname()[1]))
    dropped: list[str] = []
    server = ProxiedServer(bind_sockets("127.0.0.1", 0), relay, timeout=1.0, max_pending=10, what="test",
                           on_drop=dropped.append)
    server.start()
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        header = v2_header(("203.0.113.7", 4000), tlvs=_tlvs())
        writer.write(header[:5])  # the header in pieces: it is awaited, not refused
        await writer.drain()
        await asyncio.sleep(0.05)
        payload = os.urandom(3 << 20)  # more than the relay buffers: backpressure, both ways
        writer.write(header[5:] + payload)
        seen = (await reader.readline()).decode().strip()
        assert relay.resolve(seen) == "ipv4:203.0.113.7:4000"
        assert await reader.readexactly(len(payload)) == payload
        # The caller goes: both sides close and the record goes with them.
        writer.close()
        for _ in range(100):
            if not relay.peers:
                break
            await asyncio.sleep(0.02)
        assert relay.peers == {} and relay.resolve(seen) == seen
        # No header: closed at once, counted; none in time: closed after the timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        try:
            assert await asyncio.wait_for(reader.read(), 2) == b""
        except ConnectionResetError:  # the refusal raced the request's bytes: closed all the same
            pass
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
        assert dropped == ["proxy_header", "proxy_header"]
    finally:
        server.close()
        inner.close()
        await inner.wait_closed()


def test_relay_carries_bytes_and_the_declared_caller():
    import asyncio

    asyncio.run(_relay_round_trip())


def test_relay_resolve_leaves_other_peers():
    from gateway.workers.proxied import Relay, grpc_peer

    relay = Relay(("127.0.0.1", 1))
    relay.peers[("127.0.0.1", 5)] = grpc_peer(("2001:db8::1", 7))
    assert relay.resolve("ipv4:127.0.0.1:5") == "ipv6:[2001:db8::1]:7"
    for other in ("ipv4:127.0.0.1:6", "ipv6:[::1]:5", "unix:/tmp/x", "garbage"):
        assert relay.resolve(other) == other
