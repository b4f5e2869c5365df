"""The config as people see it: `effective_config` (what the gateway runs, secrets
left out: `check-config` prints it, `GET /admin/config` answers it) and `diff_configs`
(what a reload of another file would change: `check-config --diff`). Pure logic."""
from __future__ import annotations

from typing import Any, Callable

from gateway.config import RESTART_ONLY, GatewayConfig
from gateway.exposure import mask_headers, mask_settings, mask_url

__all__ = ["effective_config", "diff_configs"]


def _rule(r: Any) -> dict:
    out = {}
    for f in r.__dataclass_fields__:
        v = getattr(r, f)
        out[f] = sorted(v) if isinstance(v, frozenset) else v
    out["headers"], out["add_headers"] = mask_headers(r.headers), mask_headers(r.add_headers)
    out["limits"] = {k: v for k, v in _fields(r.limits).items() if v}
    return mask_settings(out)


def _fields(limits: Any) -> dict[str, Any]:
    return {f: getattr(limits, f) for f in limits.__dataclass_fields__}


def effective_config(config: GatewayConfig) -> dict:
    """The config as the gateway will run it, secrets left out: group tokens as a
    count, admin_token and other secrets masked, passwords in URLs masked."""
    return {
        "file": config.path,
        "gateway": mask_settings(config.settings),
        "groups": {
            name: {
                "tokens": len(g.tokens),
                "balance": g.balance,
                "limits": {k: v for k, v in _fields(g.limits).items() if v},
                "config_version": g.client.version,
                "rules": [_rule(r) for r in g.client.rules],
                "upstreams": {u: [mask_url(s) for s in up.servers] for u, up in g.client.upstreams.items()},
                "rollout": g.rollout.to_json() if g.rollout is not None else None,
            }
            for name, g in config.groups.items()
        },
        "routes": [_rule(r) for r in config.routes],
        "grpc_routes": [_rule(r) for r in config.grpc_routes],
        "quick": None if config.quick is None else {
            "tokens": len(config.quick.tokens), "public_url": config.quick.public_url,
            "max_tunnels": config.quick.max_tunnels, "timeout": config.quick.timeout,
        },
        "forward": [_rule(r) for r in config.forward],
        "upstreams": {u: {"servers": [mask_url(s) for s in up.servers], "balance": up.balance}
                      for u, up in config.upstreams.items()},
    }


def diff_configs(running: dict, new: dict) -> list[str]:
    """What going from `running` to `new` (both `effective_config` shapes) changes, one
    `where: what` line each, groups first; [] when nothing does."""
    out: list[str] = []
    old_groups, new_groups = running.get("groups", {}), new.get("groups", {})
    for name in sorted(set(old_groups) | set(new_groups)):
        where = f"groups.{name}"
        if name not in new_groups:
            out.append(f"{where}: removed (its clients get GOAWAY group_removed)")
        elif name not in old_groups:
            out.append(f"{where}: added (config {new_groups[name]['config_version']})")
        else:
            before = len(out)
            _diff(where, old_groups[name], new_groups[name], out, skip={"config_version"})
            new_version, rollout = new_groups[name]["config_version"], new_groups[name].get("rollout")
            if len(out) > before and old_groups[name]["config_version"] != new_version:
                who = f"its clients get config {new_version}"
                if rollout:
                    canary = rollout["canary"]
                    canary = f"{canary} client(s)" if isinstance(canary, int) else f"{canary} of its clients"
                    who = f"its canary ({canary}) gets config {new_version} first, the rest after a {rollout['bake']:g} s bake"
                out.append(f"{where}: {who} (now {old_groups[name]['config_version']})")
    for section in ("routes", "grpc_routes", "forward", "upstreams", "quick"):
        _diff(section, running.get(section), new.get(section), out)
    settings: list[str] = []
    _diff("gateway", running.get("gateway", {}), new.get("gateway", {}), settings)
    restart = {f"gateway.{k}" for k in RESTART_ONLY}
    out += [f"{line} (takes a restart: a reload with it is refused)" if line.partition(":")[0] in restart else line
            for line in settings]
    return out


def _diff(where: str, old: Any, new: Any, out: list[str], skip: frozenset[str] | set[str] = frozenset()) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        _keyed(old, new, out, lambda k: f"{where}.{k}", lambda v: f" (was {v!r})", repr, skip)
    elif _named_rules(old) and _named_rules(new):
        olds, news = {r["name"]: r for r in old}, {r["name"]: r for r in new}
        _keyed(olds, news, out, lambda n: f"{where}[{n}]", lambda _r: "", lambda r: f"-> {r.get('target')!r}")
        if [n for n in olds if n in news] != [n for n in news if n in olds]:
            out.append(f"{where}: order changed (first match wins): {[n for n in news]}")
    elif old != new:
        out.append(f"{where}: {old!r} -> {new!r}")


def _keyed(old: dict, new: dict, out: list[str], path_of: Callable[[Any], str], was: Callable[[Any], str],
           shown: Callable[[Any], str], skip: frozenset[str] | set[str] = frozenset()) -> None:
    """The entries of two mappings (settings, or rules by name): removed, added, or compared."""
    for key in [k for k in old if k not in skip] + [k for k in new if k not in old and k not in skip]:
        path = path_of(key)
        if key not in new:
            out.append(f"{path}: removed{was(old[key])}")
        elif key not in old:
            out.append(f"{path}: added ({shown(new[key])})")
        else:
            _diff(path, old[key], new[key], out)


def _named_rules(v: Any) -> bool:
    """A list of rules whose names tell them apart (matched by name, not position)."""
    return (isinstance(v, list) and all(isinstance(r, dict) and "name" in r for r in v)
            and len({r["name"] for r in v}) == len(v))
