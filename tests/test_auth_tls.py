"""Who may join a group: tokens (rotation, expiry), TLS and mTLS."""
from __future__ import annotations

import asyncio
import datetime
import re
import socket
import subprocess
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest

from gateway.tunnel import frames
from tests.harness import Stack, get_json, http, wait_heartbeats, wait_until


def _attempts(stack: Stack, client_id: str) -> int:
    return stack.clients[client_id][0].output().count("gateway rejected this client")


def _connected_ids(stack: Stack) -> set[str]:
    return {c["client_id"] for c in get_json(f"http://127.0.0.1:{stack.admin_port}/admin/clients")["clients"]}


def _token_groups(stack: Stack, doc: dict) -> None:
    web = {"web": {"servers": [stack.backend_url]}}
    rules = [{"path_prefix": "/", "upstream": "web"}]
    doc["groups"] = {
        "g1": {"tokens": ["new-token", {"token": "old-token", "expires": datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)},
                          {"token": "later-token", "expires": datetime.datetime(2999, 1, 1, tzinfo=datetime.timezone.utc)}],
               "upstreams": web, "rules": rules},
        "g2": {"tokens": ["g2-token"], "upstreams": web, "rules": rules},
    }


@pytest.fixture
def token_stack(make_stack) -> Stack:
    return make_stack(edit=_token_groups, client=None)


@pytest.mark.parametrize("token,code,reason", [("wrong", "bad_credentials", "bad_token"),
                                               ("g2-token", "bad_credentials", "bad_token"),
                                               ("old-token", "token_expired", "token_expired")])
def test_refused_tokens(token_stack, token, code, reason):
    stack = token_stack
    bad = stack.start_client("bad", token=token, wait=False)
    # A refusal no retry mends: the client says why and stops, with status 2, at its first
    # answer (one attempt per tunnel connection at most): it cannot hammer the gateway.
    wait_until(lambda: not bad.alive(), 15, what="the refused client to exit")
    out = bad.output()
    assert bad.popen.returncode == 2, out
    assert code in out and "it stops" in out
    assert 1 <= _attempts(stack, "bad") <= 2
    assert "bad" not in _connected_ids(stack)
    # The gateway logs the attempt and why, never the token.
    log = stack.gateway.output()
    assert "tunnel rejected" in log and f'"reason":"{reason}"' in log and token not in log
    # Nothing reaches a refused client: the group has no client at all.
    r = http("GET", f"{stack.url}/hello")
    assert r.status == 503 and r.json()["error"] == "no_client_available"


def test_rotation_tokens_accepted(token_stack):
    token_stack.start_client("c1", token="new-token")
    token_stack.start_client("c2", token="later-token")
    assert {"c1", "c2"} <= _connected_ids(token_stack)
    assert http("GET", f"{token_stack.url}/hello").status == 200


def test_missing_token_and_unknown_group_are_refused(token_stack):
    async def hello(group: str, token: str) -> tuple[str, str]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{token_stack.tunnel_port}") as ch:
            call = ch.stream_stream("/tunnel.v1.Tunnel/Connect")()
            await call.write(frames.encode_frame(frames.hello(client_id="raw", group=group, token=token,
                                                              version="test", capabilities=[], connection_index=0)))
            welcome = frames.decode_batch(await asyncio.wait_for(call.read(), 5))[0].welcome
            call.cancel()
            return welcome.code, welcome.message

    assert asyncio.run(hello("g1", ""))[0] == "missing_token"
    # An unknown group and a wrong token answer alike: nothing tells which groups exist.
    unknown, wrong = asyncio.run(hello("nope", "new-token")), asyncio.run(hello("g1", "not-a-token"))
    assert unknown == wrong and unknown[0] == "bad_credentials" and "nope" not in unknown[1], unknown
    # The gateway's log keeps the detail.
    log = token_stack.gateway.output()
    assert "group 'nope' is not configured" in log and '"reason":"unknown_group"' in log
    assert '"reason":"bad_token"' in log and "not-a-token" not in log
    assert http("GET", f"http://127.0.0.1:{token_stack.admin_port}/healthz").status == 200


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


def _make_cert(d: Path, ca: str, name: str, cn: str, san: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_cert(d, "ca", "server", "gateway.test", "DNS:gateway.test,DNS:localhost,IP:127.0.0.1")
    _make_cert(d, "ca", "good", "edge-1.agents.test", "DNS:edge-1.agents.test")
    _make_cert(d, "ca", "evil", "edge-1.evil.test", "DNS:edge-1.evil.test")
    return d


def test_tunnel_over_tls_and_untrusted_ca(make_stack, pki):
    stack = make_stack(settings={"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key")},
                       client_extra=["--tls", "--tls-ca", str(pki / "ca.pem")])
    assert http("GET", f"{stack.url}/hello").status == 200
    # A client that does not trust the gateway's CA refuses to connect.
    stack.start_client("c2", wait=False, extra=["--tls", "--tls-ca", str(pki / "other-ca.pem")])
    wait_until(lambda: "cannot reach gateway" in stack.clients["c2"][0].output(), 15, what="c2 refuses")
    assert "c2" not in _connected_ids(stack)
    # A plaintext client gets nowhere either.
    stack.start_client("c3", wait=False)
    wait_until(lambda: "cannot reach gateway" in stack.clients["c3"][0].output(), 15, what="c3 refused")
    # --insecure connects, with a warning.
    stack.start_client("c4", extra=["--insecure"])
    assert "NOT verified" in stack.clients["c4"][0].output()


def test_https_entry(make_stack, pki):
    import ssl
    import urllib.request

    stack = make_stack(settings={"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key"),
                                 "http_tls": True, "header_timeout": 1.0},
                       client_extra=["--tls", "--tls-ca", str(pki / "ca.pem")])
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with urllib.request.urlopen(f"https://127.0.0.1:{stack.http_port}/hello", context=ctx, timeout=10) as r:
        assert r.status == 200 and len(r.read()) == 100
    # A connection that never starts its TLS handshake is closed after header_timeout (1 s here),
    # not after asyncio's 60 s: the handshake is part of the head's time.
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=20) as s:
        assert s.recv(1) == b""
    assert time.monotonic() - t0 < 5


def test_mtls_rejects_a_certificate_of_the_wrong_name(make_stack, pki):
    def agents_only(_stack: Stack, doc: dict) -> None:
        doc["groups"]["g1"]["client_cert_names"] = ["*.agents.test"]

    tls = ["--tls", "--tls-ca", str(pki / "ca.pem")]
    stack = make_stack(settings={"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key"),
                                 "tls_client_ca": str(pki / "ca.pem")}, edit=agents_only, client="good",
                       client_extra=[*tls, "--tls-cert", str(pki / "good.pem"), "--tls-key", str(pki / "good.key")])
    assert http("GET", f"{stack.url}/hello").status == 200
    evil = stack.start_client("evil", wait=False,
                              extra=[*tls, "--tls-cert", str(pki / "evil.pem"), "--tls-key", str(pki / "evil.key")])
    # bad_certificate is fatal: the client stops with status 2.
    wait_until(lambda: not evil.alive(), 15, what="evil rejected and stopped")
    assert "bad_certificate" in evil.output() and evil.popen.returncode == 2
    assert "evil" not in _connected_ids(stack)
    # No certificate at all: the TLS handshake itself fails.
    stack.start_client("anon", wait=False, extra=tls)
    wait_until(lambda: "cannot reach gateway" in stack.clients["anon"][0].output(), 15, what="anon refused")
    assert _connected_ids(stack) == {"good"}


def test_duplicate_client_id_newest_wins(make_stack):
    stack = make_stack(settings={"workers": 1}, client_extra=["--connections", "1"])
    first = stack.clients["c1"][0]
    stack.clients["old"] = stack.clients.pop("c1")
    second = stack.start_client("c1", extra=["--connections", "1"])
    # Two processes with one identity are a deployment error: the replaced one names the
    # duplicate in an error and exits with status 1 (not 0, not a silent stop).
    wait_until(lambda: not first.alive(), 15, what="the replaced client to exit")
    out = first.output()
    assert first.popen.returncode == 1, out
    assert re.search(r'"level":"error".*took over connection 0.*"group":"g1"', out), out
    assert "client_id 'c1'" in out and "group 'g1'" in out
    assert "duplicate client identity" in stack.gateway.output()
    clients = get_json(f"http://127.0.0.1:{stack.admin_port}/admin/clients")["clients"]
    assert len(clients) == 1 and clients[0]["client_id"] == "c1"
    assert http("GET", f"{stack.url}/hello").status == 200
    # No fight: the old process does not take the connection back. Its back-off after a
    # GOAWAY is none at all, so a fight would show within the new stream's first heartbeats.
    wait_heartbeats(stack, 2, "c1")
    assert "took over connection" not in second.output()
    assert first.output().count("tunnel connected") == 1
    assert len(get_json(f"http://127.0.0.1:{stack.admin_port}/admin/clients")["clients"]) == 1
