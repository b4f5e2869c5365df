"""One tunnel certificate serves every node of a fleet (issue 18 part 6): nodes A
(127.0.0.2) and B (127.0.0.3) share one certificate with a SAN per node. A client given
node A's address only, verifying against the CA, learns node B from WELCOME and verifies
B with the same certificate: one connection on each node, and requests entering either
node reach it. A certificate without B's SAN makes the client refuse B (it stays on A).

Real processes, a real redis-server and openssl; every process is stopped after the test."""
from __future__ import annotations

import pytest

from tests.harness import free_port, http, wait_until
from tests.test_auth_tls import _make_ca, _make_cert
from tests.test_fleet import A, B, node_settings
from tests.test_fleet_clients import groups_on, placement


@pytest.fixture(scope="module")
def fleet_pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet-pki")
    _make_ca(d, "ca")
    _make_cert(d, "ca", "fleet", "gateway.test", f"DNS:gateway.test,IP:{A},IP:{B}")
    _make_cert(d, "ca", "a-only", "gateway.test", f"DNS:gateway.test,IP:{A}")
    return d


def start_fleet(redis_server, make_stack, pki, cert: str):
    peer_port = free_port()
    tls = {"tls_cert": str(pki / f"{cert}.pem"), "tls_key": str(pki / f"{cert}.key")}
    a = make_stack(host=A, name="gateway-a", settings={**node_settings(redis_server.url, "a", peer_port), **tls},
                   client=None)
    b = make_stack(host=B, name="gateway-b", like=a, client=None,
                   settings={**node_settings(redis_server.url, "b", peer_port), **tls})
    wait_until(lambda: groups_on(a, "b") is not None and groups_on(b, "a") is not None, 15,
               what="the nodes see each other", watch=(a.gateway, b.gateway))
    client = a.start_client("c1", wait=False, extra=["--connections", "2", "--tls", "--tls-ca", str(pki / "ca.pem")])
    return a, b, client


def test_one_certificate_with_a_san_per_node(redis_server, make_stack, fleet_pki):
    a, b, client = start_fleet(redis_server, make_stack, fleet_pki, "fleet")
    node_a, node_b = f"{A}:{a.tunnel_port}", f"{B}:{b.tunnel_port}"
    wait_until(lambda: sorted(placement(a)) == [node_a, node_b], 20, what="one verified connection on each node",
               watch=(client, a.gateway, b.gateway))
    for stack in (a, b):
        assert all(http("GET", f"{stack.url}/hello").status == 200 for _ in range(5))
    assert "NOT verified" not in client.output()


def test_a_node_the_certificate_does_not_name_is_refused(redis_server, make_stack, fleet_pki):
    a, b, client = start_fleet(redis_server, make_stack, fleet_pki, "a-only")
    node_a = f"{A}:{a.tunnel_port}"
    # The client learns B, cannot verify it, and keeps its connections on A.
    node_b = f"{B}:{b.tunnel_port}"
    wait_until(lambda: any("cannot reach gateway" in line and node_b in line for line in client.output().splitlines()),
               20, what="the client refused b", watch=(client, a.gateway, b.gateway))
    assert placement(a) == [node_a, node_a]
    assert "NOT verified" not in client.output()
    # Requests entering B still reach the client, through A's streams.
    wait_until(lambda: http("GET", f"{b.url}/hello", timeout=5).status == 200, 10, what="b reaches the client on a")
