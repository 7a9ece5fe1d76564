"""The one value checker behind every config section, and the helpers that declare fields.

A section is a frozen dataclass deriving from :class:`Section`. Its ``__post_init__`` checks every field against
its annotation (a Literal, a tuple of X, int, float, bool, str or a nested section) and its range (or pattern) metadata,
coerces an int given for a float and a list given for a tuple (with ``object.__setattr__``, so the object stays
frozen and equals the one the YAML loader builds), then runs the section's cross-field ``_rules``, and raises
:class:`ConfigError` listing every problem. Each message names the dotted path (the section's ``_path`` plus the
field), the bad value and what is allowed; the YAML loader reports exactly the same lines.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Literal


class ConfigError(ValueError):
    """One or more problems in a config; ``errors`` holds one message per problem."""

    def __init__(self, errors: Iterable[str], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__("\n".join(head + e for e in self.errors))

    def __reduce__(self):  # pickles (e.g. across Ray workers) with its list of errors intact
        return type(self), (self.errors, self.source)


def num(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
        hi_open: bool = False) -> Any:
    """A numeric field in [lo, hi] (``lo_open``/``hi_open`` exclude a bound); for a tuple, each element's range."""
    return field(default=default, metadata={"range": (lo, hi, lo_open, hi_open)})


@dataclass(frozen=True)
class Pattern:
    """The allowed form of a string field: ``regex`` (matched in full) and ``text``, what an error says is allowed."""

    regex: str
    text: str


def matching(default: str, regex: str, text: str) -> Any:
    """A string field that must match ``regex`` in full; ``text`` says what is allowed."""
    return field(default=default, metadata={"pattern": Pattern(regex, text)})


def sub(cls: type) -> Any:
    """A nested section, by default the section's defaults."""
    return field(default_factory=cls)


def did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` for the choice nearest a string ``value``, or ``""``."""
    close = difflib.get_close_matches(value, [str(c) for c in choices], n=1) if isinstance(value, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _range_text(r) -> str:
    lo, hi, lo_open, hi_open = r
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def _in_range(v: float, r) -> bool:
    lo, hi, lo_open, hi_open = r
    return math.isfinite(v) and not (lo is not None and (v < lo or (lo_open and v == lo))) and not (
        hi is not None and (v > hi or (hi_open and v == hi)))


_IS = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def check_value(tp: Any, value: Any, path: str, rng=None) -> tuple[Any, list[str]]:
    """Check ``value`` against annotation ``tp`` and range ``rng``: (the value, coerced, and [] or its errors)."""
    if typing.get_origin(tp) is tuple:
        if _IS[float](value):
            value = [value]  # a number where a list is expected: a one-element list
        if not isinstance(value, (list, tuple)):
            return value, [f"{path}: {value!r} is not allowed; expected {type_name(tp)}"]
        checked = [check_value(typing.get_args(tp)[0], v, f"{path}[{i}]", rng) for i, v in enumerate(value)]
        return tuple(v for v, _ in checked), [e for _, errs in checked for e in errs]
    if typing.get_origin(tp) is Literal:
        args = typing.get_args(tp)
        if value in args and type(value) is type(args[0]):
            return value, []
        return value, [f"{path}: {value!r} is not allowed; expected {type_name(tp)}{did_you_mean(value, args)}"]
    if not (isinstance(value, tp) if dataclasses.is_dataclass(tp) else _IS[tp](value)):
        return value, [f"{path}: {value!r} ({type(value).__name__}) is not allowed; expected {type_name(tp)}"]
    if isinstance(rng, Pattern):
        if tp is str and not re.fullmatch(rng.regex, value):
            return value, [f"{path}: {value!r} is not allowed; expected {rng.text}"]
        return value, []
    if rng is not None and tp in (int, float) and not _in_range(value, rng):
        return value, [f"{path}: {value!r} is out of range; allowed {_range_text(rng)}"]
    return (float(value) if tp is float else value), []


@functools.cache
def spec(cls: type) -> tuple[tuple[str, Any, Any], ...]:
    """(name, resolved annotation, range or :class:`Pattern`) of each field of section ``cls``."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name], f.metadata.get("range", f.metadata.get("pattern")))
                 for f in dataclasses.fields(cls))


def field_errors(obj: Any) -> list[str]:
    """Check (and coerce in place) every field of section ``obj``; one message per problem."""
    errors: list[str] = []
    for name, tp, rng in spec(type(obj)):
        value, errs = check_value(tp, getattr(obj, name), f"{obj._path}.{name}" if obj._path else name, rng)
        errors += errs
        if not errs:
            object.__setattr__(obj, name, value)
    return errors


def unchecked(cls: type, values: dict[str, Any]) -> Any:
    """Section ``cls`` with ``values`` (defaults elsewhere) and no checks: the loader's stand-in for a section
    with errors, so that its parent's own fields can still be checked."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
        else:
            value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        object.__setattr__(obj, f.name, value)
    return obj


class Section:
    """Base of every config dataclass: checks itself when constructed (and by ``dataclasses.replace``)."""

    _path: ClassVar[str] = ""  # dotted path of this section in a Config ("" for the root)

    def __post_init__(self) -> None:
        errors = field_errors(self)
        if not errors:  # cross-field rules only see well-typed, in-range fields
            errors = list(self._rules())
        if errors:
            raise ConfigError(errors)

    def _rules(self) -> Iterable[str]:
        """Cross-field checks: one message per problem."""
        return ()


def check_resource_map(value: object, path: str, own: dict[str, str]) -> tuple[object, list[str]]:
    """(``value`` as ``{name: float}``, and [] or one message per problem) for a mapping of custom Ray resources at
    ``path``; ``own`` names the fields that set this stage's CPUs and GPUs (``{"cpu": ..., "gpu": ...}``)."""
    if not isinstance(value, dict):
        return value, [f"{path}: {value!r} is not allowed; expected a mapping of custom resource names to "
                       "amounts, e.g. {gpu_node: 0.001}"]
    out, errors = {}, []
    for key, amount in value.items():
        where = f"{path}.{key}"
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,99}", key):
            errors.append(f"{path}: key {key!r} is not allowed; expected a resource name (letters, digits, "
                          "_ . : / -), e.g. gpu_node")
        elif key.lower() in own or key.lower() in ("memory", "object_store_memory"):
            hint = (f"set it with ray.{own[key.lower()]}" if key.lower() in own else "not requested by stages")
            errors.append(f"{where}: not allowed ({hint}); {path} holds custom resources such as gpu_node")
        elif not isinstance(amount, (int, float)) or isinstance(amount, bool):
            errors.append(f"{where}: {amount!r} ({type(amount).__name__}) is not allowed; expected a number")
        elif not (amount == 0 or 1e-4 <= amount <= 1e6):  # Ray's resource precision is 0.0001
            errors.append(f"{where}: {amount!r} is out of range; allowed 0 or [0.0001, 1000000]")
        else:
            out[key] = float(amount)
    return out, errors
