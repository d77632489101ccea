"""Sweep values as experiment overrides: written so that `config.parse_override` reads back the
same value (1, 1.0, true and "1" kept apart), and tidied as a person would write them."""

from __future__ import annotations

import json
import math
from typing import Any

import yaml

from litlab.config import parse_override
from litlab.errors import UserError


def canon(v: Any) -> str:
    """Identity of a value that tells 1, 1.0 and true apart (== does not)."""
    return json.dumps(v, sort_keys=True)


def to_overrides(params: dict[str, Any]) -> list[str]:
    """{dotted key: value} -> ["key=value", ...] that config.parse_override reads back identically."""
    return [f"{k}={format_value(v)}" for k, v in params.items()]


def format_value(v: Any) -> str:
    """One value as the text after `key=` in an override (YAML that reads back as the same value)."""
    if isinstance(v, float) and not math.isfinite(v):
        return ".nan" if math.isnan(v) else (".inf" if v > 0 else "-.inf")
    if isinstance(v, (bool, type(None))):
        text = {True: "true", False: "false", None: "null"}[v]
    elif isinstance(v, (int, float, str)):  # repr: the shortest exact float; strings plain if YAML agrees
        text = v if isinstance(v, str) else repr(v)
    else:  # lists and mappings as YAML flow: [128, 64]
        text = yaml.safe_dump(json.loads(json.dumps(v)), default_flow_style=True, width=math.inf).strip()
    for candidate in (text, json.dumps(v)):  # else quoted: "true", "1e-3", "a: b", ...
        try:
            if canon(parse_override(f"x={candidate}")[1]) == canon(v):
                return candidate
        except (UserError, TypeError):
            pass
    raise ValueError(f"cannot write {v!r} as an override value")


def tidy(x: float) -> float:
    """0.30000000000000004 -> 0.3: grid and midpoint values as a person would write them."""
    return float(f"{x:.12g}")
