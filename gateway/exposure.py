"""What is exposed and what is secret: loopback addresses, and masking secrets
(tokens, keys, passwords in URLs) before anything is printed or logged. Pure
logic, no I/O."""
from __future__ import annotations

import ipaddress
import re
from typing import Any, Mapping

__all__ = ["MASK", "is_loopback", "is_secret_name", "is_secret_header", "mask_headers", "mask_url", "mask_text",
           "mask_settings"]

MASK = "***"

# A setting whose name says it holds a secret (admin_token, a password, a secret key).
# Paths to key files (tls_key) name a file, not its content, and are shown.
_SECRET_NAME = re.compile(r"(^|_)(token|password|passwd|secret|secret_key|private_key|curve_secret)($|_)")
# Header values that are credentials: a route's add_headers or match headers may carry them.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})
_SECRET_HEADER_WORD = re.compile(r"token|secret|password|passwd|api-?key|auth|session|signature")
# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*):(?P<pw>[^@\s/]+)@")


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches: 127.0.0.0/8, ::1, `localhost`.
    Anything else (0.0.0.0, ::, a name, an interface's address) is not."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def foreign_to_loopback(host_header: str, origin: str | None, method: str) -> str | None:
    """Why a request to a port bound to loopback without a token comes from elsewhere, or
    None. A web page can rebind its own name to 127.0.0.1 (its Host is then that name) or
    post a form here (its Origin is then the page's): neither may read request data or
    replay requests."""
    host = host_header.strip()
    name = host[1:host.find("]")] if host.startswith("[") else host.rpartition(":")[0] if ":" in host else host
    if not is_loopback(name):
        return f"Host {host_header!r} is not a loopback name"
    if method not in ("GET", "HEAD", "OPTIONS") and origin and origin != "null":
        from urllib.parse import urlsplit  # here: only a form post from a page asks

        if not is_loopback(urlsplit(origin).hostname or ""):
            return f"Origin {origin!r} is not a loopback page"
    return None


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name.lower()))


def is_secret_header(name: str) -> bool:
    """True for a header whose value is a credential (Authorization, Cookie, X-Api-Key, *-Token...)."""
    name = name.lower()
    return name in _SECRET_HEADERS or bool(_SECRET_HEADER_WORD.search(name))


def mask_headers(pairs: Any) -> list[list[str]]:
    """(name, value) pairs as they may be printed: credential values masked."""
    return [[k, MASK if is_secret_header(k) and v else mask_url(v)] for k, v in pairs]


def mask_url(url: str) -> str:
    """A URL with its password (if any) masked."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", url)


def mask_text(text: str) -> str:
    """Any text (a log line) with passwords in the URLs it holds masked."""
    return mask_url(text) if "@" in text else text


def _mask_value(v: Any) -> Any:
    if isinstance(v, str):
        return mask_url(v)
    if isinstance(v, (list, tuple)):
        return [_mask_value(x) for x in v]
    if isinstance(v, Mapping):
        return {k: MASK if is_secret_name(str(k)) and x else _mask_value(x) for k, x in v.items()}
    return v


def mask_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as they may be printed: secrets (by name) masked when set, passwords in URLs masked."""
    return {k: (MASK if v else v) if is_secret_name(k) else _mask_value(v) for k, v in settings.items()}
