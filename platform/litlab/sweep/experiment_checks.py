"""A sweep's space checked against its base experiment before any trial runs: the experiment, the
sweep's overrides, and every choice and bound of every space key (with activating values of its
parents and typical values of the others), so that no trial fails on a config mistake."""

from __future__ import annotations

import warnings
from typing import Any

from litlab.config import parse_override
from litlab.errors import ConfigError, UserError
from litlab.sweep.spec import SweepSpec, objective_overrides
from litlab.sweep.values import format_value, to_overrides


def check_against_experiment(spec: SweepSpec, before_import: bool = True, classes: bool = True) -> None:
    """Every space key and value must be valid for the base experiment, so that no trial fails on a
    config mistake: the bounds and every choice, each with an activating value of its parents and
    the other active params at a typical value (nesterov=true needs the momentum set, ...). All of
    them first as `litlab run` checks before importing Lightning (0.5 s for a typo), then with the
    model and data classes (each pass if asked)."""
    passes = [check for check, asked in ((_check_before_import, before_import), (_check_with_the_classes, classes))
              if asked]
    for check_all in passes:
        for key, prefix, overrides in _configs_to_check(spec):
            try:
                check_all(spec, overrides)
            except UserError as e:
                raise _told_for(spec, key, prefix, e) from None


def _configs_to_check(spec: SweepSpec) -> list[tuple[str, str, list[str]]]:
    """(the key an error is told for, its prefix, the overrides of the base experiment to check)."""
    checks = [("experiment", str(spec.experiment), [])]
    base = spec.overrides + objective_overrides(spec)
    checks.append(("overrides", f"invalid for {spec.experiment.name}", base))
    fixed, by_key = {parse_override(o)[0] for o in spec.overrides}, {p.key: p for p in spec.space}
    for p in spec.space:
        if p.key in fixed:
            raise ConfigError(f"space.{p.key}", "is also set in overrides: remove one of them")
        labelled = [(f"choice {format_value(c)}", c) for c in p.choices] if p.type == "categorical" else \
            [(f"low={format_value(p.low)}", p.low), (f"high={format_value(p.high)}", p.high)]
        for label, v in labelled:
            pinned, todo = {p.key: v}, [p]
            while todo:  # give every ancestor a value that activates its child
                for parent, allowed in todo.pop().when.items():
                    if parent not in pinned:
                        pinned[parent] = allowed[0]
                        todo.append(by_key[parent])
            values: dict[str, Any] = {}
            for q in spec.space:
                if q.active(values):
                    values[q.key] = pinned.get(q.key, q.typical())
            if p.key not in values:
                raise ConfigError(f"space.{p.key}", "can never be active: its when conditions (and its parents') contradict")
            label += "".join(f" (with {k}={format_value(x)})" for k, x in pinned.items() if k != p.key)
            checks.append((f"space.{p.key}", f"{label} is invalid for {spec.experiment.name}", base + to_overrides(values)))
    return checks


def _told_for(spec: SweepSpec, key: str, prefix: str, e: UserError) -> ConfigError:
    """The error of one check, told for the space key it names: `space.model.dropot: ...` (a
    misspelt key fails every check, whichever value was being checked)."""
    first = (str(e).splitlines() or [type(e).__name__])[0]
    named = str(getattr(e, "key", "")).partition("[")[0]  # model.hidden[1] -> model.hidden
    if key.startswith("space.") and named != key[len("space."):] and named in {p.key for p in spec.space}:
        return ConfigError(f"space.{named}", f"invalid for {spec.experiment.name}: {first}")
    return ConfigError(key, f"{prefix}: {first}")


def _check_before_import(spec: SweepSpec, overrides: list[str]) -> None:
    """What `litlab run` checks before the import of Lightning (model_index: names, arguments, values)."""
    from litlab.early_checks import check_experiment

    check_experiment(spec.experiment, overrides)


def _check_with_the_classes(spec: SweepSpec, overrides: list[str]) -> None:
    """load_config, then build the model on the meta device (no memory, ~ms) for the ConfigErrors a
    model raises in its constructor (mlp width without depth, LeNet on too small images, ...)."""
    import torch

    from litlab import registry
    from litlab.runner import load_config

    cfg = load_config(spec.experiment, overrides)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            registry.get_model(cfg.model["name"]).cls(**{k: v for k, v in cfg.model.items() if k != "name"})
    except Exception as e:  # anything but a config mistake: not for this check to judge
        if isinstance(e, UserError):
            raise
