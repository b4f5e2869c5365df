"""One client identity across the nodes of a fleet (issue 17's rule, issue 18's fleet): two
processes with one identity (group g1, client id "dup") on two nodes are a deployment error,
as on one host: the older connection is replaced and its process names the duplicate in an
error and exits with status 1; the newer one serves the group through both nodes. A client
moving its own connection from node to node (make-before-break) is not a duplicate: the
HELLO says which process it is. Real processes and a real redis-server; every process is
stopped after the test, passed or failed."""
from __future__ import annotations

import re

from tests.harness import free_port, get_json, http, wait_until
from tests.test_fleet import A, B, node_settings, sees_client


def test_a_duplicate_identity_on_another_node_is_replaced(redis_server, make_stack):
    peer_port = free_port()
    a = make_stack(host=A, name="gateway-a", settings=node_settings(redis_server.url, "a", peer_port), client=None)
    b = make_stack(host=B, name="gateway-b", like=a, settings=node_settings(redis_server.url, "b", peer_port),
                   client=None)
    first = a.start_client("dup", extra=["--connections", "1", "--no-learn-fleet"])
    wait_until(lambda: sees_client(b, {"g1": 1}), 15, what="node b sees the first process", watch=(a.gateway, b.gateway))
    second = b.start_client("dup", extra=["--connections", "1", "--no-learn-fleet"])

    wait_until(lambda: not first.alive(), 15, what="the replaced process to exit", watch=(a.gateway, b.gateway))
    out = first.output()
    assert first.popen.returncode == 1, out
    assert re.search(r'"level":"error".*took over connection 0', out), out
    assert "client_id 'dup'" in out and "group 'g1'" in out
    assert "duplicate client identity" in a.gateway.output()
    # The newer process serves g1 through both nodes; the older never comes back.
    wait_until(lambda: get_json(f"{a.admin_url}/admin/clients")["clients"] == [], 10, what="a holds no stream of dup")
    for stack in (a, b):
        wait_until(lambda s=stack: http("GET", f"{s.url}/hello", timeout=5).status == 200, 10,
                   what=f"{stack.name} serves g1")
    assert second.alive() and "took over connection" not in second.output()
    assert out.count("tunnel connected") == 1
