"""Unit tests of the peer links' CURVE keys: the settings and their checks (both or
neither, the own key listed, the files, flags and environment), the key file's
format, secrets never printed, and two PeerLinks with keys on real loopback sockets
(a listed node links; an unlisted one, or one without keys, does not; a listed node
cannot speak for another)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

import orjson
import pytest
import zmq

from gateway.cli import build_parser, effective_config, main
from gateway.cluster.config import cluster_settings, curve_keypair, curve_public, parse_public_keys
from gateway.config import ENV_PREFIX, load_gateway_config, restart_only_change
from gateway.router import envelope as env
from gateway.router.peers import PeerLinks
from gateway.settings import ConfigError
from tests.harness import free_port, wait_until
from tests.test_unit_fleet import node, pump

REDIS = "redis://127.0.0.1:6379/0"
PUB, SEC = curve_keypair()
OTHER_PUB, OTHER_SEC = curve_keypair()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def load(tmp_path: Path, gateway: str, argv: list[str] | None = None):
    path = tmp_path / "gateway.toml"
    path.write_text(f'[gateway]\ncluster = "{REDIS}"\nhost = "10.0.0.2"\n{gateway}\n')
    return load_gateway_config(str(path), build_parser().parse_args(["-c", str(path), *argv]) if argv else None)


def test_the_pure_python_keys_are_zmqs():
    for _ in range(5):
        public, secret = zmq.curve_keypair()
        assert curve_public(secret.decode()) == public.decode()
    assert zmq.curve_public(SEC.encode()).decode() == PUB


def test_keys_in_the_file_reach_the_router(tmp_path):
    cfg = load(tmp_path, f'cluster_secret_key = "{SEC}"\ncluster_public_keys = ["{OTHER_PUB}", "{PUB}", "{PUB}"]')
    s = cluster_settings(cfg.settings)
    assert (s.secret_key, s.public_key, s.public_keys) == (SEC, PUB, (OTHER_PUB, PUB))
    assert SEC not in repr(s)
    plain = cluster_settings(load(tmp_path, "").settings)
    assert (plain.secret_key, plain.public_key, plain.public_keys) == ("", "", ())


def test_key_files_flags_and_environment(tmp_path, monkeypatch):
    (tmp_path / "secret").write_text(SEC + "\n")
    (tmp_path / "keys").write_text(f"# the fleet\n\n{PUB}  # node a\n\t{OTHER_PUB}\n")
    cfg = load(tmp_path, f'cluster_secret_key_file = "{tmp_path}/secret"\ncluster_public_keys_file = "{tmp_path}/keys"')
    assert (cfg.cluster_secret_key, cfg.cluster_public_keys) == (SEC, (PUB, OTHER_PUB))
    cfg = load(tmp_path, "", [f"--cluster-secret-key={SEC}", f"--cluster-public-keys={PUB},{OTHER_PUB}"])
    assert cluster_settings(cfg.settings).public_keys == (PUB, OTHER_PUB)
    # Z85 holds "-": a key that starts with it still passes as --flag=KEY (it failed CI once as two words)
    dash_pub, dash_sec = next(pair for pair in (curve_keypair() for _ in range(10_000)) if pair[1].startswith("-"))
    cfg = load(tmp_path, "", [f"--cluster-secret-key={dash_sec}", f"--cluster-public-keys={dash_pub}"])
    assert cluster_settings(cfg.settings).public_key == dash_pub
    monkeypatch.setenv(ENV_PREFIX + "CLUSTER_SECRET_KEY", SEC)
    monkeypatch.setenv(ENV_PREFIX + "CLUSTER_PUBLIC_KEYS", PUB)
    assert cluster_settings(load(tmp_path, "").settings).public_key == PUB


def test_key_file_format():
    hashed = next(k for k in (curve_keypair()[0] for _ in range(10_000)) if "#" in k)  # Z85 holds "#"
    assert parse_public_keys(f"# comment\n{PUB} # a\n\n{hashed}\n  # {OTHER_PUB} left out\n{PUB}\n") == (PUB, hashed)
    assert parse_public_keys("#" + PUB[1:]) == ()  # a comment: no key starts with "#" (it would exceed 32 bits)
    with pytest.raises(ValueError, match="line 2"):
        parse_public_keys(f"{PUB}\nnot-a-key\n")
    with pytest.raises(ValueError, match="line 1"):
        parse_public_keys(f"{PUB} trailing words\n")


@pytest.mark.parametrize("gateway,key", [
    (f'cluster_secret_key = "{SEC}"', "gateway.cluster_public_keys"),
    (f'cluster_public_keys = ["{PUB}"]', "gateway.cluster_secret_key"),
    (f'cluster_secret_key = "{SEC}"\ncluster_public_keys = ["{OTHER_PUB}"]', "gateway.cluster_public_keys"),
    ('cluster_secret_key = "short"', "gateway.cluster_secret_key"),
    (f'cluster_secret_key = "{SEC[:-1]}~"', "gateway.cluster_secret_key"),  # "~" is not Z85
    (f'cluster_secret_key = "{SEC}"\ncluster_public_keys = ["{PUB}", 7]', "gateway.cluster_public_keys"),
    (f'cluster_secret_key = "{SEC}"\ncluster_secret_key_file = "/nonexistent"\ncluster_public_keys = ["{PUB}"]',
     "gateway.cluster_secret_key_file"),
    (f'cluster_secret_key_file = "/nonexistent/key"\ncluster_public_keys = ["{PUB}"]',
     "gateway.cluster_secret_key_file"),
    (f'cluster_secret_key = "{SEC}"\ncluster_public_keys_file = "/nonexistent/keys"', "gateway.cluster_public_keys_file"),
])
def test_bad_keys_are_refused_naming_the_key(tmp_path, gateway, key):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, gateway)
    assert exc.value.key == key and exc.value.file.endswith("gateway.toml"), str(exc.value)
    assert SEC not in str(exc.value) and SEC[:-1] not in str(exc.value)


def test_bad_lines_of_key_files_are_refused(tmp_path):
    (tmp_path / "secret").write_text("nope\n")
    (tmp_path / "keys").write_text(f"{PUB}\n{PUB[:20]}\n")
    with pytest.raises(ConfigError, match="cluster_secret_key_file"):
        load(tmp_path, f'cluster_secret_key_file = "{tmp_path}/secret"\ncluster_public_keys = ["{PUB}"]')
    with pytest.raises(ConfigError, match="cluster_public_keys_file: line 2"):
        load(tmp_path, f'cluster_secret_key = "{SEC}"\ncluster_public_keys_file = "{tmp_path}/keys"')


def test_the_secret_is_never_printed(tmp_path, capsys):
    cfg = load(tmp_path, f'cluster_secret_key = "{SEC}"\ncluster_public_keys = ["{PUB}"]')
    shown = orjson.dumps(effective_config(cfg)).decode()
    assert SEC not in shown and PUB in shown
    assert main(["check-config", str(tmp_path / "gateway.toml")]) == 0
    out = capsys.readouterr()
    assert SEC not in out.out + out.err and orjson.loads(out.out)["gateway"]["cluster_secret_key"] != SEC
    other = load(tmp_path, f'cluster_secret_key = "{OTHER_SEC}"\ncluster_public_keys = ["{OTHER_PUB}"]')
    refused = restart_only_change(cfg, other)
    assert refused is not None and SEC not in str(refused) and OTHER_SEC not in str(refused)


def test_keygen_prints_a_working_pair(capsys):
    assert main(["keygen"]) == 0
    lines = capsys.readouterr().out.splitlines()
    secret = lines[0].split('"')[1]
    public = lines[1].split('"')[1]
    assert lines[0].startswith("cluster_secret_key = ") and zmq.curve_public(secret.encode()).decode() == public


# -- peer links with keys (real sockets) -------------------------------------------------------


def keyed(rec, public: str, secret: str, allowed: tuple[str, ...]) -> tuple[PeerLinks, zmq.Context]:
    ctx = zmq.Context()  # one ZAP handler per context: a context per node
    p = PeerLinks(dataclasses.replace(rec, curve_key=public), bind=rec.peer, secret_key=secret, public_keys=allowed)
    p.bind(ctx)
    return p, ctx


def test_only_listed_keys_link(caplog):
    caplog.set_level(logging.INFO, "gateway.router")
    (pa, sa), (pb, sb), (pc, sc) = curve_keypair(), curve_keypair(), curve_keypair()
    fleet_keys = (pa, pb)
    a, ca = keyed(node("a", free_port()), pa, sa, fleet_keys)
    b, cb = keyed(node("b", free_port()), pb, sb, fleet_keys)
    c, cc = keyed(node("c", free_port()), pc, sc, (pa, pb, pc))  # it lists them; they do not list it
    plain_rec = node("d", free_port())
    d, cd = PeerLinks(plain_rec, bind=plain_rec.peer), zmq.Context()
    d.bind(cd)
    sides = {"a": a, "b": b, "c": c, "d": d}
    try:
        records = {name: side.own for name, side in sides.items()}
        for side in sides.values():
            side.sync(records)

        def step() -> list:
            for side in (a, b, c):
                side.authenticate()
            return pump(*sides.values())

        wait_until(lambda: step() == [] and a.peers["b"].live and b.peers["a"].live, 5, what="a and b linked")
        wait_until(lambda: step() == [] and f"CURVE key {pc[:8]}... is not in cluster_public_keys" in caplog.text
                   and "refused a peer link" in caplog.text, 5, what="a refuses c's handshake")
        # c's frames never reach a; none of c's, d's links is live anywhere.
        with contextlib.suppress(zmq.Again):  # no handshake done: it cannot even queue
            c.peers["a"].dealer.send_multipart(env.to_peer(b"w0", b"c/w0", env.FRAMES, b"x"), zmq.NOBLOCK)
        for _ in range(20):
            assert step() == []
        assert not any(s.peers[n].live for s in (a, b) for n in ("c", "d")) and not c.peers["a"].live
        assert not any(p.live for p in d.peers.values())
        assert "its peer links are plaintext" in caplog.text and "uses CURVE keys and this node has none" in caplog.text
        refusals = [r for r in caplog.records if r.getMessage().startswith("refused a peer link")]
        assert len(refusals) == 2  # a and b: once each for c's address, though c redials
        # A listed node speaking as another (b's id, a's key): dropped, not delivered.
        rogue = ca.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.setsockopt(zmq.ROUTING_ID, b"b")
        rogue.curve_serverkey, rogue.curve_publickey, rogue.curve_secretkey = pa.encode(), pa.encode(), sa.encode()
        rogue.connect(a.own.peer)
        rogue.send_multipart(env.to_peer(b"w0", b"b/w0", env.FRAMES, b"x"))
        wait_until(lambda: step() == [] and "not its record's" in caplog.text, 5, what="the impostor dropped")
        rogue.close(0)
    finally:
        for side, ctx in ((a, ca), (b, cb), (c, cc), (d, cd)):
            side.close()
            ctx.term()
