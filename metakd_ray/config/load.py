"""Configs from YAML and ``key=value`` overrides, with every problem of the whole file reported at once."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from metakd_ray.config.fields import ConfigError, field_errors, spec, unchecked
from metakd_ray.config.schema import Config


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value), the value parsed as YAML (so ``[0.1, 1.0]``, ``true``, ``2e-5`` work)."""
    if "=" not in text:
        raise ConfigError([f"{text}: not an override; expected key=value, e.g. distill.gamma2=0.2"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError([f"{text}: empty key; expected key=value, e.g. distill.gamma2=0.2"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 2e-5 as a string (YAML 1.1); accept it as a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and value.strip() not in ("", ".") else value
        except ValueError:
            pass
    return key.split("."), value


def _set_path(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def _yaml_float_fix(obj: Any) -> Any:
    """YAML 1.1 reads ``2e-5`` (no dot) as a string; numbers written that way are meant as floats."""
    if isinstance(obj, dict):
        return {k: _yaml_float_fix(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_yaml_float_fix(v) for v in obj]
    if isinstance(obj, str):
        try:
            if any(c in obj for c in "eE") and obj.strip()[0:1] in "+-0123456789.":
                return float(obj)
        except ValueError:
            return obj
    return obj


def _unknown_key(path: str, key: Any, names: list[str]) -> str:
    prefix = f"{path}." if path else ""
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6) or [n for n in names if str(key) in n][:1]
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    return f"{prefix}{key}: unknown key; allowed: {', '.join(names)}{hint}"


def _build(cls: type, data: Any, errors: list[str]) -> tuple[Any, bool]:
    """Section ``cls`` from a mapping: (it, True); or (an unchecked stand-in, False) with its problems appended to
    ``errors``. A section whose subsections have errors gets its own fields checked but not its cross-field rules."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{cls._path or '<root>'}: {data!r} is not allowed; expected a mapping")
        return cls(), False
    names = [name for name, _, _ in spec(cls)]
    sections = {name: tp for name, tp, _ in spec(cls) if dataclasses.is_dataclass(tp)}
    values: dict[str, Any] = {}
    ok = True
    for key, value in data.items():
        if key not in names:
            errors.append(_unknown_key(cls._path, key, names))
        elif key in sections:
            values[key], sub_ok = _build(sections[key], value, errors)
            ok = ok and sub_ok
        else:
            values[key] = value
    if ok:
        try:
            return cls(**values), True
        except ConfigError as e:
            errors.extend(e.errors)
            return unchecked(cls, values), False
    stand_in = unchecked(cls, values)
    errors.extend(field_errors(stand_in))
    return stand_in, False


def from_dict(data: dict | None, overrides: list[str] | tuple[str, ...] = (), source: str | None = None) -> Config:
    """Build and check a :class:`Config` from plain data plus ``key=value`` overrides; raise :class:`ConfigError`
    listing every problem."""
    errors: list[str] = []
    tree = _yaml_float_fix(dict(data or {}))
    for ov in overrides:
        try:
            keys, value = parse_override(ov)
        except ConfigError as e:
            errors.extend(e.errors)
            continue
        _set_path(tree, keys, value)
    cfg, _ = _build(Config, tree, errors)
    if errors:
        raise ConfigError(errors, source)
    return cfg


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config file, apply overrides, check everything."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"{p}: no such config file"])
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError([f"{p}:{where} is not valid YAML ({getattr(e, 'problem', e)})"]) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError([f"{p}: the top level must be a mapping of sections (data, model, ...)"])
    return from_dict(data, overrides, source=str(p))


def to_dict(cfg: Any) -> dict:
    """Plain, YAML-safe dict (tuples become lists)."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A checked copy of ``cfg`` with ``key=value`` overrides applied (``["data.root=/x", "seed=3"]``)."""
    return from_dict(to_dict(cfg), overrides)


def write_resolved(cfg: Config, directory: str | Path) -> Path:
    """Write the resolved config beside an artefact (``<directory>/config.yaml``)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = d / "config.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(out)
    return out
