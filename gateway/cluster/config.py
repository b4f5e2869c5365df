"""The fleet's settings: the `[gateway]` keys that make a gateway one node of
several (`cluster` and the rest), their checks, and what the router process
needs of them. Pure logic, no I/O (the host name aside): the supervisor's
process loads this before it spawns anyone.

Without `cluster` none of this takes effect: a gateway is one host, as before,
and needs no Redis.

The CURVE keys of the peer links are checked here too: Z85 decoding and the
X25519 public key of a secret key are done in pure Python because this module
runs in the supervisor, which must not load zmq (tests/test_layout.py)."""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from gateway.ports import is_wildcard
from gateway.settings import ConfigError, Errors, Setting, port, positive_float, string

__all__ = ["CLUSTER_SETTINGS", "ClusterSettings", "check_cluster", "cluster_settings", "NODE_ID",
           "curve_keypair", "curve_public", "parse_public_keys"]

# A node id is one token: it names Redis keys and prefixes remote worker
# identities ("NODE/wI"), so it never holds a "/".
NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def cluster_url(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    if not v:
        return v
    parts = urllib.parse.urlsplit(v)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("must be a redis:// or rediss:// URL (redis://host:6379/0), or empty for one host")
    return v


def node_id(v: Any) -> str:
    if not isinstance(v, str) or (v and not NODE_ID.fullmatch(v)):
        raise ValueError("must be one token of letters, digits, '.', '_' or '-' (at most 64), without '/'")
    return v


def key_prefix(v: Any) -> str:
    if not isinstance(v, str) or not v or any(c.isspace() for c in v):
        raise ValueError("must be a non-empty string without spaces")
    return v


def host_name(v: Any) -> str:
    if not isinstance(v, str) or any(c.isspace() or c in "/[]@" for c in v):
        raise ValueError("must be an address or a host name (no scheme, no port)")
    if ":" in v:  # only an IPv6 address may hold one
        try:
            ipaddress.IPv6Address(v)
        except ValueError:
            raise ValueError("must be an address or a host name (no scheme, no port)") from None
    return v


_Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_INDEX = {c: i for i, c in enumerate(_Z85)}
_P = 2 ** 255 - 19  # Curve25519's field (RFC 7748)


def _z85_decode(text: str) -> bytes:
    if len(text) % 5 or any(c not in _Z85_INDEX for c in text):
        raise ValueError("not Z85")
    out = bytearray()
    for i in range(0, len(text), 5):
        n = 0
        for c in text[i:i + 5]:
            n = n * 85 + _Z85_INDEX[c]
        if n >= 1 << 32:
            raise ValueError("not Z85")
        out += n.to_bytes(4, "big")
    return bytes(out)


def _z85_encode(data: bytes) -> str:
    out = []
    for i in range(0, len(data), 4):
        n = int.from_bytes(data[i:i + 4], "big")
        out.append("".join(_Z85[n // 85 ** k % 85] for k in range(4, -1, -1)))
    return "".join(out)


def _x25519_base(secret: bytes) -> bytes:
    """X25519(secret, 9), RFC 7748's ladder. Not constant-time: it runs once at start
    (and in keygen), on this host, where nobody can time it."""
    k = bytearray(secret)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    scalar = int.from_bytes(k, "little")
    x2, z2, x3, z3, swap = 1, 0, 9, 1, 0
    for t in range(254, -1, -1):
        bit = (scalar >> t) & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b, c, d = x2 + z2, x2 - z2, x3 + z3, x3 - z3
        aa, bb, da, cb = a * a, b * b, d * a, c * b
        e = aa - bb
        x3, z3 = (da + cb) ** 2 % _P, 9 * (da - cb) ** 2 % _P
        x2, z2 = aa * bb % _P, e * (aa + 121665 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")


def curve_public(secret_key: str) -> str:
    """The Z85 public key of a Z85 secret key (what zmq.curve_public computes)."""
    return _z85_encode(_x25519_base(_z85_decode(secret_key)))


def curve_keypair() -> tuple[str, str]:
    """A new (public, secret) pair in Z85, as zmq.curve_keypair makes one (random 32 bytes)."""
    secret = _z85_encode(os.urandom(32))
    return curve_public(secret), secret


def curve_key(v: Any) -> str:
    # The message never repeats the value: it may be a secret key.
    if not isinstance(v, str) or (v and (len(v) != 40 or not _passes(_z85_decode, v))):
        raise ValueError("must be a CURVE key: 40 characters of Z85 (tunnel-gateway keygen makes them)")
    return v


def _passes(check: Callable[[str], Any], text: str) -> bool:
    try:
        check(text)
    except ValueError:
        return False
    return True


def curve_keys(v: Any) -> tuple[str, ...]:
    """Z85 public keys, as a TOML list or one comma-separated string (flag, environment)."""
    items = [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)):
        raise ValueError("must be a list of CURVE public keys")
    for i, item in enumerate(items):
        try:
            curve_key(item)
        except ValueError as exc:
            raise ValueError(f"entry {i + 1}: {exc}") from None
    return tuple(dict.fromkeys(items))  # each once, in order


def parse_public_keys(text: str) -> tuple[str, ...]:
    """A public keys file: one Z85 key a line, a comment after it (past a space), blank
    lines and # comment lines. Z85 holds "#", but never first in a key ("#" is digit 84,
    and 84 x 85^4 exceeds the 32 bits 5 characters hold): a line is a key when its first
    word is one, else a comment when it starts with "#"."""
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split(None, 1)
        if not words:
            continue
        word, rest = words[0], words[1] if len(words) > 1 else ""
        if _passes(curve_key, word) and (not rest or rest.startswith("#")):
            keys.append(word)
        elif not word.startswith("#"):
            raise ValueError(f"line {n}: must be a CURVE public key (40 characters of Z85) or a # comment")
    return tuple(dict.fromkeys(keys))


CLUSTER_SETTINGS: tuple[Setting, ...] = (
    Setting("cluster", "", cluster_url,
            "Redis URL of the fleet's registry (redis:// or rediss://, a password in it is never logged); "
            "empty: this gateway is one host"),
    Setting("cluster_prefix", "tunnel", key_prefix,
            "prefix of the fleet's Redis keys (fleets sharing a Redis keep apart by it)"),
    Setting("node_id", "", node_id, "this node's id in the fleet (empty: the host name)"),
    Setting("peer_port", 7100, port, "port (on host) where other nodes' routers reach this node's (with cluster)"),
    Setting("advertise_host", "", host_name,
            "the address other nodes and clients dial for this node (empty: host; required when host is a wildcard)"),
    Setting("node_ttl", 5.0, positive_float,
            "seconds a node's registry lease lasts: a node that stops renewing leaves the fleet within 1.5x this"),
    Setting("cluster_secret_key", "", curve_key,
            "this node's CURVE secret key (Z85, 40 characters; tunnel-gateway keygen): encrypts and authenticates "
            "the peer links, with cluster_public_keys (never printed; a key may start with '-': write "
            "--cluster-secret-key=KEY)"),
    Setting("cluster_secret_key_file", "", string, "a file holding cluster_secret_key (instead of the setting)"),
    Setting("cluster_public_keys", (), curve_keys,
            "CURVE public keys (Z85) of every node allowed in the fleet, this one's included; "
            "a node whose key is not listed cannot link (flag: --cluster-public-keys=KEY,KEY)"),
    Setting("cluster_public_keys_file", "", string,
            "a file of cluster_public_keys, one a line (# comments), instead of the setting"),
)


@dataclass(frozen=True)
class ClusterSettings:
    """What the router process needs to be this node of the fleet (picklable)."""

    url: str
    prefix: str
    node_id: str
    node_ttl: float
    peer: str    # tcp://advertise_host:peer_port: what other nodes' routers dial
    tunnel: str  # advertise_host:tunnel_port: what clients dial
    bind: str    # tcp://host:peer_port: where this node's router listens for them
    # CURVE (Z85); all empty: plaintext peer links. repr=False: a config logged never shows the secret.
    secret_key: str = field(default="", repr=False)
    public_key: str = ""
    public_keys: tuple[str, ...] = ()


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def check_cluster(settings: dict[str, Any], path: str) -> None:
    """With `cluster` set: fill in node_id (the host name) and advertise_host
    (host), and refuse what cannot work, naming the key. The CURVE keys are
    checked (and read from their files) either way."""
    errors = Errors()  # every error found, raised together
    errors.check(check_curve, settings, path)
    if not settings["cluster"]:
        errors.raise_any()
        return
    if not settings["node_id"]:
        name = socket.gethostname()
        if not NODE_ID.fullmatch(name):
            errors.add(ConfigError(path, "gateway.node_id", f"the host name {name!r} is not a valid node id: set node_id"))
        else:
            settings["node_id"] = name
    if not settings["peer_port"]:
        errors.add(ConfigError(path, "gateway.peer_port", "must be set (not 0) with cluster"))
    if not settings["advertise_host"]:
        if is_wildcard(settings["host"]):
            errors.add(ConfigError(path, "gateway.advertise_host",
                                   f"is required with cluster when host ({settings['host'] or '*'}) is a wildcard: "
                                   "the address other nodes and clients dial for this node"))
        else:
            settings["advertise_host"] = settings["host"]
    elif is_wildcard(settings["advertise_host"]):
        errors.add(ConfigError(path, "gateway.advertise_host",
                               f"must be an address other nodes can dial, not a wildcard ({settings['advertise_host']!r})"))
    errors.raise_any()


def _read(path: str, key: str, file: str) -> str:
    try:
        with open(file, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"gateway.{key}", f"cannot read {file!r}: {exc.__class__.__name__}") from None


def check_curve(settings: dict[str, Any], path: str) -> None:
    """The keys from their files (a setting and its file are exclusive), both or neither,
    and this node's own public key among the listed ones. Leaves the keys themselves in
    `cluster_secret_key` and `cluster_public_keys`."""
    secret, publics = settings["cluster_secret_key"], settings["cluster_public_keys"]
    if settings["cluster_secret_key_file"]:
        if secret:
            raise ConfigError(path, "gateway.cluster_secret_key_file", "set it or cluster_secret_key, not both")
        try:
            secret = curve_key(_read(path, "cluster_secret_key_file", settings["cluster_secret_key_file"]).strip())
        except ValueError as exc:
            raise ConfigError(path, "gateway.cluster_secret_key_file", str(exc)) from None
    if settings["cluster_public_keys_file"]:
        if publics:
            raise ConfigError(path, "gateway.cluster_public_keys_file", "set it or cluster_public_keys, not both")
        try:
            publics = parse_public_keys(_read(path, "cluster_public_keys_file", settings["cluster_public_keys_file"]))
        except ValueError as exc:
            raise ConfigError(path, "gateway.cluster_public_keys_file", str(exc)) from None
    if bool(secret) != bool(publics):
        missing = "cluster_public_keys" if secret else "cluster_secret_key"
        raise ConfigError(path, f"gateway.{missing}",
                          "cluster_secret_key and cluster_public_keys (or their files) go together: set both or neither")
    if secret and curve_public(secret) not in publics:
        raise ConfigError(path, "gateway.cluster_public_keys",
                          f"must list this node's own public key ({curve_public(secret)}, of cluster_secret_key)")
    settings["cluster_secret_key"], settings["cluster_public_keys"] = secret, publics


def cluster_settings(settings: Mapping[str, Any]) -> ClusterSettings | None:
    """The router's part of a checked config (`check_cluster`); None for one host."""
    if not settings.get("cluster"):
        return None
    advertised = _bracketed(settings["advertise_host"])
    bind_host = "*" if is_wildcard(settings["host"]) else _bracketed(settings["host"])
    secret = settings["cluster_secret_key"]
    return ClusterSettings(
        url=settings["cluster"], prefix=settings["cluster_prefix"], node_id=settings["node_id"],
        node_ttl=settings["node_ttl"], peer=f"tcp://{advertised}:{settings['peer_port']}",
        tunnel=f"{advertised}:{settings['tunnel_port']}", bind=f"tcp://{bind_host}:{settings['peer_port']}",
        secret_key=secret, public_key=curve_public(secret) if secret else "",
        public_keys=tuple(settings["cluster_public_keys"]),
    )
