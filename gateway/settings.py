"""The settings table shared by the CLI and the TOML files, and config errors.

Each scalar setting is declared once (name, flag, default, validator,
description); `load_section` validates a TOML table against it and
`add_arguments` / `apply_overrides` make the matching CLI flags.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["ConfigError", "Setting", "SettingsAccess", "read_toml", "load_section", "add_arguments", "apply_overrides", "apply_env",
           "env_name", "entry_settings",
           "positive_int", "non_negative_int", "positive_float", "port", "string", "choice", "boolean", "host_port", "networks"]


class ConfigError(Exception):
    """A bad configuration value; names the file and the key."""

    def __init__(self, file: str, key: str, message: str) -> None:
        super().__init__(f"{file}: {key}: {message}")
        self.file = file
        self.key = key
        self.message = message


Validator = Callable[[Any], Any]


def positive_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError("must be a positive integer")
    return v


def non_negative_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError("must be a non-negative integer")
    return v


def positive_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise ValueError("must be a positive number")
    return float(v)


def port(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
        raise ValueError("must be a port number (0-65535)")
    return v


def string(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    return v


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def choice(*options: str) -> Validator:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return v

    return check


def host_port(v: Any) -> str:
    if not isinstance(v, str) or ":" not in v:
        raise ValueError("must be 'host:port'")
    host, _, p = v.rpartition(":")
    if not host or not p.isdigit() or not 0 <= int(p) <= 65535:
        raise ValueError("must be 'host:port'")
    return v


def networks(v: Any) -> tuple[str, ...]:
    """Addresses or CIDRs, as a TOML list or one comma-separated string (flag, environment)."""
    items = [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ValueError("must be a list of addresses or CIDRs")
    out = []
    for item in items:
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or CIDR") from None
    return tuple(out)


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    validate: Validator
    help: str
    flag: bool = True

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def entry_settings(entry: str, max_connections: int, per: str) -> tuple[Setting, ...]:
    """The connection bounds and forwarding trust of an HTTP entry (the gateway's
    public entry, the client's local entry): one declaration for both."""
    return (
        Setting("header_timeout", 15.0, positive_float,
                f"{entry}: seconds a connection has to send a whole request head, from accept and from the "
                "first byte after a response (then 408, or closed when it sent nothing)"),
        Setting("keepalive_timeout", 75.0, positive_float,
                f"{entry}: seconds an idle keep-alive connection is kept between requests"),
        Setting("max_connections", max_connections, positive_int,
                f"{entry}: open connections{per}; beyond, new ones are closed at once (and counted)"),
        Setting("trusted_proxies", (), networks,
                "callers (addresses or CIDRs) whose X-Forwarded-For/-Proto/-Host are kept and "
                "appended to; anyone else's are replaced"),
    )


class SettingsAccess:
    """Settings read as attributes (config.http_port) of a frozen, picklable config."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["settings"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __getstate__(self) -> dict:
        return self.__dict__

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(p), "-", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), "-", f"not valid TOML: {exc}") from None


def load_section(table: Any, settings: Sequence[Setting], file: str, section: str) -> dict[str, Any]:
    """Defaults overlaid with the file's [section]; unknown keys are errors."""
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise ConfigError(file, section, "must be a table")
    known = {s.name: s for s in settings}
    for key in table:
        if key not in known:
            raise ConfigError(file, f"{section}.{key}", "unknown key")
    values: dict[str, Any] = {}
    for s in settings:
        raw = table.get(s.name, s.default)
        try:
            values[s.name] = s.validate(raw)
        except ValueError as exc:
            raise ConfigError(file, f"{section}.{s.name}", str(exc)) from None
    return values


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _from_text(text: str, default: Any) -> Any:
    """Parse an environment value by the type of the setting's default."""
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("must be true or false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError("must be an integer") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError("must be a number") from None
    return text


def env_name(prefix: str, setting: Setting) -> str:
    return prefix + setting.name.upper()


def apply_env(values: dict[str, Any], settings: Sequence[Setting], prefix: str,
              environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Environment variables (PREFIX + NAME) override the file."""
    environ = os.environ if environ is None else environ
    for s in settings:
        name = env_name(prefix, s)
        if name in environ:
            try:
                values[s.name] = s.validate(_from_text(environ[name], s.default))
            except ValueError as exc:
                raise ConfigError("environment", name, str(exc)) from None
    return values


def add_arguments(parser: argparse.ArgumentParser, settings: Sequence[Setting], env_prefix: str = "") -> None:
    for s in settings:
        if not s.flag:
            continue
        env = f", env {env_name(env_prefix, s)}" if env_prefix else ""
        kind = type(s.default) if s.default is not None and not isinstance(s.default, (bool, tuple)) else str
        if isinstance(s.default, bool):
            parser.add_argument(s.option, dest=s.name, default=None, action=argparse.BooleanOptionalAction,
                                help=f"{s.help} (default: {s.default}{env})")
        else:
            parser.add_argument(s.option, dest=s.name, default=None, type=kind,
                                help=f"{s.help} (default: {s.default!r}{env})")


def apply_overrides(values: dict[str, Any], args: argparse.Namespace, settings: Sequence[Setting], where: str = "command line") -> dict[str, Any]:
    for s in settings:
        v = getattr(args, s.name, None)
        if v is None:
            continue
        try:
            values[s.name] = s.validate(v)
        except ValueError as exc:
            raise ConfigError(where, s.option, str(exc)) from None
    return values


def check_mapping(value: Any, file: str, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(file, key, "must be a table")
    return value
