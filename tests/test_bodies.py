"""Bodies through the tunnel, both ways: ingress (public entry -> client ->
backend) and egress (client's local entry -> gateway forward rule -> backend),
uploads and downloads of 0 B, 1 B, 1 MiB and 64 MiB, checked by sha256; chunked
uploads (no Content-Length) too."""
from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp
import pytest

from tests.harness import Stack

SIZES = [0, 1, 1 << 20, 64 << 20]
IDS = ["0B", "1B", "1MiB", "64MiB"]


@pytest.fixture(scope="module")
def stack(make_module_stack) -> Stack:
    """One stack for the module (each test checks its own bytes)."""
    return make_module_stack(settings={"workers": 1})


@pytest.fixture(scope="module")
def payloads() -> dict[int, bytes]:
    # Random bytes: a reordered, dropped or doubled chunk changes the hash.
    return {n: os.urandom(n) for n in SIZES}


def _base(stack: Stack, way: str) -> str:
    return stack.url if way == "ingress" else stack.local_url("c1")


async def _upload(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as r:
            return r.status, await r.json(content_type=None)


async def _download(url: str) -> tuple[int, str | None, str, int]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(url, timeout=aiohttp.ClientTimeout(total=60)) as r:
            h = hashlib.sha256()
            n = 0
            async for chunk in r.content.iter_chunked(1 << 16):
                h.update(chunk)
                n += len(chunk)
            return r.status, r.headers.get("Content-Length"), h.hexdigest(), n


def _chunks(data: bytes, size: int):
    async def gen():
        for i in range(0, len(data), size):
            yield data[i:i + size]

    return gen()


BOTH = pytest.mark.parametrize("way", ["ingress", "egress"])


@BOTH
@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_upload(stack, payloads, way, size):
    data = payloads[size]
    status, answer = asyncio.run(_upload(f"{_base(stack, way)}/sink", data))
    assert status == 200, answer
    assert answer == {"sha256": hashlib.sha256(data).hexdigest(), "size": size}


@BOTH
@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_download(stack, way, size):
    status, length, digest, n = asyncio.run(_download(f"{_base(stack, way)}/bytes/{size}"))
    assert status == 200
    assert length == str(size)  # the backend's Content-Length is kept
    assert n == size and digest == hashlib.sha256(b"\xab" * size).hexdigest()


@BOTH
@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_chunked_upload(stack, payloads, way, size):
    data = payloads[size]
    # Odd chunk sizes: the tunnel's chunking must not depend on the caller's.
    status, echo = asyncio.run(_upload(f"{_base(stack, way)}/echo/up", _chunks(data, 65537 if size > 1 else 1)))
    assert status == 200, echo
    assert echo["method"] == "POST"
    assert (echo["sha256"], echo["size"]) == (hashlib.sha256(data).hexdigest(), size)
    names = {n.lower() for n, _ in echo["headers"]}
    assert "content-length" not in names or size == 0


def test_both_directions_at_once(stack, payloads):
    """Big uploads and downloads, ingress and egress, all in flight together."""
    data = payloads[64 << 20]
    digest = hashlib.sha256(data).hexdigest()
    big = 64 << 20

    async def main():
        return await asyncio.gather(
            _upload(f"{stack.url}/sink", data),
            _upload(f"{stack.local_url()}/sink", _chunks(data, 100_000)),
            _download(f"{stack.url}/bytes/{big}"),
            _download(f"{stack.local_url()}/bytes/{big}"),
        )

    up_in, up_out, down_in, down_out = asyncio.run(main())
    assert up_in == (200, {"sha256": digest, "size": big})
    assert up_out == (200, {"sha256": digest, "size": big})
    expected = hashlib.sha256(b"\xab" * big).hexdigest()
    assert down_in == (200, str(big), expected, big)
    assert down_out == (200, str(big), expected, big)
    stack.wait_idle()
