"""TLS for the tunnel (grpc credentials) and the HTTP entry (ssl contexts).
Import only in a worker or client process (it imports grpc)."""
from __future__ import annotations

import fnmatch
import logging
import ssl
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import grpc

__all__ = ["server_credentials", "channel_credentials", "client_ssl_context", "http_ssl_context", "peer_names", "name_allowed"]

log = logging.getLogger("gateway.tls")


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """Tunnel port credentials; with `client_ca`, clients must show a certificate it signed (mTLS)."""
    return grpc.ssl_server_credentials(
        [(_read(key), _read(cert))],
        root_certificates=_read(client_ca) if client_ca else None,
        require_client_auth=bool(client_ca),
    )


def _fetch_server_cert(server: str) -> bytes:
    host, _, port = server.rpartition(":")
    return ssl.get_server_certificate((host.strip("[]"), int(port))).encode()


def _cert_name(pem: bytes) -> str:
    """A DNS name or the CN of a certificate, to match it by (stdlib only)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as fh:
        fh.write(pem)
        fh.flush()
        try:
            info = ssl._ssl._test_decode_cert(fh.name)  # the stdlib's own PEM decoder
        except (AttributeError, ssl.SSLError, ValueError):
            return ""
    for kind, value in info.get("subjectAltName", ()):
        if kind == "DNS":
            return value
    for rdn in info.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    return ""


def channel_credentials(server: str, *, ca: str = "", cert: str = "", key: str = "",
                        insecure: bool = False) -> tuple[grpc.ChannelCredentials, str]:
    """The client's credentials: verify the gateway against `ca` (or the system
    roots). `insecure` trusts whatever certificate the gateway shows; then the
    second value is the name to expect in it."""
    roots = _read(ca) if ca else None
    name = ""
    if insecure:
        roots, name = _insecure_roots(server)
    creds = grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=_read(key) if key else None,
        certificate_chain=_read(cert) if cert else None,
    )
    return creds, name


def client_ssl_context(server: str, *, ca: str = "", cert: str = "", key: str = "",
                       insecure: bool = False) -> tuple[ssl.SSLContext, str | None]:
    """The same for the client's own HTTP/2 tunnel (gateway/tunnel/h2_call.py): an
    ssl context (ALPN h2) and the name to check the certificate against (None:
    the host of `server`)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
    name = None
    if insecure:
        pem, name = _insecure_roots(server)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=pem.decode())
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf itself is the trust anchor
        if not name:
            name = None
            ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(cert, key or None)
    ctx.set_alpn_protocols(["h2"])
    return ctx, name


def _insecure_roots(server: str) -> tuple[bytes, str]:
    """--insecure: whatever certificate the gateway shows, and the name in it."""
    log.warning("--insecure: the gateway's certificate is NOT verified; anyone in the path can read the tunnel")
    pem = _fetch_server_cert(server)
    return pem, _cert_name(pem)


def http_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def peer_names(auth_context: dict[str, Sequence[bytes]]) -> list[str]:
    """CN and SANs of the client certificate, from a grpc auth context."""
    names = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        names.extend(v.decode(errors="replace") for v in auth_context.get(key, ()))
    return names


def name_allowed(names: Iterable[str], patterns: Sequence[str]) -> bool:
    """Any certificate name matches any allowed pattern (shell-style, e.g. *.agents.example)."""
    return any(fnmatch.fnmatchcase(n.lower(), p.lower()) for n in names for p in patterns)
