"""Small typed-schema checker shared by the config sections and the model/data signatures.

A type is any of: int, float, bool, str, None, Literal[...], list[T], tuple[T, ...], dict,
Optional/Union, and Annotated[T, Range(...)] for bounds. Values are checked (and gently coerced:
int -> float, 32 -> "32" for a string Literal, list -> tuple) and errors name the dotted key.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from litlab.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Bounds for a number: Annotated[float, Range(gt=0, le=10)]."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        # 1 and 1.0 alike: equal Ranges are one object in typing's cache of Annotated[...], so
        # which of the two a class's annotation holds depends on which was written first
        bounds = ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
        return " and ".join(f"{op} {_bound(v)}" for op, v in bounds if v is not None)

    def holds(self, v: float) -> bool:
        return not (
            (self.gt is not None and not v > self.gt)
            or (self.ge is not None and not v >= self.ge)
            or (self.lt is not None and not v < self.lt)
            or (self.le is not None and not v <= self.le)
        )


def _bound(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else str(v)


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = get_args(tp)
        rng = [m for m in meta if isinstance(m, Range)]
        return type_name(base) + (f" ({rng[0].describe()})" if rng else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        inner = type_name(args[0]) if args else "any"
        return f"a list of {inner}"
    if tp is type(None):
        return "null"
    if tp is typing.Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def check(value: Any, tp: Any, key: str) -> Any:
    """Return `value` checked against `tp` (coerced where harmless); raise ConfigError otherwise."""
    if tp is typing.Any:
        return value
    origin = get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = get_args(tp)
        value = check(value, base, key)
        for m in meta:
            if isinstance(m, Range) and isinstance(value, (int, float)) and not m.holds(value):
                raise ConfigError(key, f"{value!r} is out of range: must be {m.describe()}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        # Try the exact-type options first so `int | str` keeps 2 an int.
        for opt in sorted(options, key=lambda o: 0 if _exact(value, o) else 1):
            if opt is type(None):
                continue
            try:
                return check(value, opt, key)
            except ConfigError as e:
                errors.append(e)
        range_errors = [e for e in errors if "out of range" in str(e)]
        if range_errors:
            raise range_errors[0]
        raise ConfigError(key, f"expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if any(type(c) is type(value) and c == value for c in choices):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) in choices:
            return str(value)
        raise ConfigError(key, f"{value!r} is not allowed: choose one of {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected {type_name(tp)}, got {value!r}")
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in get_args(tp):  # fixed-length tuple
            if len(value) != len(args):
                raise ConfigError(key, f"expected {len(args)} values, got {len(value)}")
            return [check(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        inner = args[0] if args else typing.Any
        return [check(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and math.isnan(value):
                raise ConfigError(key, "expected a number, got nan")
            return float(value)
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, f"expected null, got {value!r}")
    return value  # unannotated or exotic: accept as is


def _exact(value: Any, tp: Any) -> bool:
    base = get_args(tp)[0] if get_origin(tp) is typing.Annotated else tp
    if base is float:
        return isinstance(value, float)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(base, type) and isinstance(value, base)
