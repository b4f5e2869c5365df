"""A 1 GiB body through the tunnel, each way, never sits in memory: the
gateway's and the client's resident memory stay under 150 MB throughout."""
from __future__ import annotations

import sys

import pytest

from tests.harness import ROOT, Stack

sys.path.insert(0, str(ROOT / "scripts"))

from bench import big_transfer  # noqa: E402
from bench_stack import RssSampler  # noqa: E402

GIB = 1 << 30
LIMIT_MB = 150


@pytest.fixture
def big_stack(make_stack) -> Stack:
    return make_stack(settings={"max_body_bytes": 2 * GIB, "access_log": "off"},
                      client_extra=["--max-body-bytes", str(2 * GIB), "--access-log", "off"])


@pytest.mark.parametrize("way", ["ingress", "egress"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_one_gib_each_way_in_bounded_memory(big_stack, method, way):
    stack = big_stack
    url = stack.url if way == "ingress" else stack.local_url()
    groups = {"gateway": stack.gateway, "client": stack.clients["c1"][0]}
    with RssSampler(groups, interval=0.02) as rss:
        result, detail = big_transfer(url, method, GIB)
    assert result.errors == 0, detail  # every byte arrived, checked by size and hash
    assert rss.peak["gateway"] > 0 and rss.peak["client"] > 0  # the sampler saw the processes
    assert rss.peak["gateway"] < LIMIT_MB, rss.peak
    assert rss.peak["client"] < LIMIT_MB, rss.peak
    stack.wait_idle()
