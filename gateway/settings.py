"""The settings table shared by the CLI and the TOML files, and config errors.

Each scalar setting is declared once (name, flag, default, validator,
description); `load_section` validates a TOML table against it and
`add_arguments` / `apply_overrides` make the matching CLI flags.
"""
from __future__ import annotations

import argparse
import difflib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from gateway.exposure import is_secret_name

__all__ = ["ConfigError", "Errors", "unknown_keys", "Setting", "SettingsAccess", "read_toml", "load_section", "add_arguments", "apply_overrides", "apply_env",
           "env_name", "entry_settings",
           "positive_int", "non_negative_int", "positive_float", "port", "string", "choice", "boolean", "host_port", "networks"]


class ConfigError(Exception):
    """A bad configuration value; names the file and the key. One error may carry
    others found in the same file (`also`): `errors` lists them all, the first
    being this one, and `str()` is one `file: key: message` line each."""

    def __init__(self, file: str, key: str, message: str, also: Sequence["ConfigError"] = ()) -> None:
        self.file = file
        self.key = key
        self.message = message
        self.errors: tuple[ConfigError, ...] = (self, *also)
        super().__init__("\n".join(e.line for e in self.errors))

    @property
    def line(self) -> str:
        return f"{self.file}: {self.key}: {self.message}"


T = TypeVar("T")


class Errors:
    """Collects the config errors of a file, so that every one is reported, not only the first."""

    def __init__(self) -> None:
        self.found: list[ConfigError] = []

    def add(self, exc: ConfigError) -> None:
        self.found.extend(exc.errors)

    def check(self, fn: Callable[..., T], *args: Any, default: Any = None, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)`, or `default` when it raises ConfigError (kept)."""
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            self.add(exc)
            return default

    def __bool__(self) -> bool:
        return bool(self.found)

    def raise_any(self) -> None:
        """Raise one ConfigError carrying every error found (the first names file and key)."""
        if self.found:
            first, *rest = self.found
            raise ConfigError(first.file, first.key, first.message, rest)


def unknown_keys(table: Mapping[str, Any], known: Iterable[str], file: str, section: str,
                 what: str = "key") -> list[ConfigError]:
    """An error for each key of `table` not in `known`, quoting it (and the nearest known name)."""
    known = list(known)
    out = []
    for key in table:
        if key in known:
            continue
        near = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        out.append(ConfigError(file, f"{section}.{key}" if section else str(key), f"unknown {what} {key!r}{hint}"))
    return out


def _shown(name: str, value: Any) -> str:
    """A value quoted in an error message; a secret's never is."""
    if is_secret_name(name):
        return "a value of type " + type(value).__name__
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _quoting(message: str, name: str, value: Any) -> str:
    """A validator's message, quoting the value it refused unless it quotes (a part of) it already."""
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else [value]
    if any(repr(p) in message for p in parts if p != ""):
        return message
    return f"{message}, got {_shown(name, value)}"


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


def choice(*options: str, fold_case: bool = False) -> Validator:
    """One of `options`; with `fold_case`, in any case (INFO, Debug), kept in the options' case."""
    def check(v: Any) -> str:
        if fold_case and isinstance(v, str):
            v = v.lower()
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
        # tomllib's message ends "(at line L, column C)" (3.11 has no attributes for them): say where first.
        at = re.search(r"\s*\(at line (\d+), column (\d+)\)$", str(exc))
        where = f"line {at[1]}, column {at[2]}" if at else "-"
        message = str(exc)[:at.start()] if at else str(exc)
        raise ConfigError(str(p), where, f"not valid TOML: {message}") from None
    except IsADirectoryError:
        raise ConfigError(str(p), "-", "is a directory, not a file") from None


def load_section(table: Any, settings: Sequence[Setting], file: str, section: str,
                 collect: Errors | None = None) -> dict[str, Any]:
    """Defaults overlaid with the file's [section]; unknown keys are errors. Every error
    is raised as one ConfigError, or added to `collect` (a bad value then reads as its default)."""
    if table is None:
        table = {}
    errors = Errors()
    if not isinstance(table, dict):
        errors.add(ConfigError(file, section, f"must be a table, got {_shown(section, table)}"))
        table = {}
    for exc in unknown_keys(table, (s.name for s in settings), file, section):
        errors.add(exc)
    values: dict[str, Any] = {}
    for s in settings:
        raw = table.get(s.name, s.default)
        try:
            values[s.name] = s.validate(raw)
        except ValueError as exc:
            errors.add(ConfigError(file, f"{section}.{s.name}", _quoting(str(exc), s.name, raw)))
            values[s.name] = s.default  # so the checks after this one still run
    if collect is None:
        errors.raise_any()
    else:
        for exc in errors.found:
            collect.add(exc)
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
    errors = Errors()
    for s in settings:
        name = env_name(prefix, s)
        if name in environ:
            try:
                values[s.name] = s.validate(_from_text(environ[name], s.default))
            except ValueError as exc:
                errors.add(ConfigError("environment", name, _quoting(str(exc), s.name, environ[name])))
    errors.raise_any()
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
    errors = Errors()
    for s in settings:
        v = getattr(args, s.name, None)
        if v is None:
            continue
        try:
            values[s.name] = s.validate(v)
        except ValueError as exc:
            errors.add(ConfigError(where, s.option, _quoting(str(exc), s.name, v)))
    errors.raise_any()
    return values


def check_mapping(value: Any, file: str, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(file, key, f"must be a table, got {_shown(key, value)}")
    return value
