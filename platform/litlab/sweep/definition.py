"""What defines a study's trials, recorded in the study, so that a rerun cannot mix other trials in.

A study's trials are ranked and pruned against each other, so they must share what they are:
the experiment's config that every trial starts from (the sweep's experiment and overrides, resolved;
the keys a space param always sets left out), the metric(s) and the space. The first sweep of a study
records that (a study user attribute); a rerun whose definition differs is refused in one line that
names what differs, as Optuna's directions are. Run-time settings (n_trials, timeout, sampler,
pruner, storage, heartbeats, workers) may change from one run to the next.

A study made before this record existed has none: it resumes, and records the definition then. A
study whose every trial failed because the metric is not logged (nothing ran to compare) takes the
new definition.
"""

from __future__ import annotations

import json
from typing import Any

from litlab.config import flatten
from litlab.errors import UserError

DEFINITION = "litlab.definition"  # study user attr: the definition of its trials (JSON data)
N_TRIALS = "litlab.n_trials"  # study user attr: the n_trials it was last run with (for --show)
# What does not change what a trial computes: names, where things are written, logging
IGNORED = ("name", "description", "tracking.", "trainer.enable_progress_bar", "callbacks.checkpoint.dirpath",
           "callbacks.checkpoint.save_top_k", "callbacks.checkpoint.every_n_train_steps", "callbacks.lr_monitor",
           "data.num_workers")
SHOWN = 3  # differences named in the message


def definition(spec, base_config: dict[str, Any]) -> dict[str, Any]:
    """{config: {dotted key: value}, metric: [...], space: {key: {...}}}, as JSON data. `base_config`
    is the experiment's config with the sweep's overrides (runner.load_config(...).to_dict())."""
    from litlab.config import parse_override
    from litlab.sweep.spec import objective_overrides

    # every trial sets these: the space's unconditional params; the metric's checkpoint monitor
    always_set = {p.key for p in spec.space if not p.when} | {parse_override(o)[0] for o in objective_overrides(spec)}
    config = {k: v for k, v in flatten(base_config).items()
              if k not in always_set and not any(k == i or (i.endswith(".") and k.startswith(i)) for i in IGNORED)}
    return json.loads(json.dumps({"config": config, "metric": list(spec.metrics),
                                  "space": {p.key: p.to_dict() for p in spec.space}}, default=str))


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs, as 'trainer.max_epochs is 2 in the study, 8 here'."""
    out = []
    if recorded.get("metric") != current["metric"]:
        out.append(f"metric is {_one(recorded.get('metric'))} in the study, {_one(current['metric'])} here")
    old, new = recorded.get("config", {}), current["config"]
    # keys in both only: a litlab that adds a config key (at its default) must not lock old studies out
    for k in sorted(set(old) & set(new)):
        if old[k] != new[k]:
            out.append(f"{k} is {_show(old[k])} in the study, {_show(new[k])} here")
    old, new = recorded.get("space", {}), current["space"]
    for k in [*new, *(k for k in old if k not in new)]:
        if k not in old or k not in new:
            out.append(f"space.{k} is {'not in the study' if k not in old else 'not in this sweep'}")
            continue
        for part in sorted(set(old[k]) | set(new[k])):
            if old[k].get(part, _MISSING) != new[k].get(part, _MISSING):
                out.append(f"space.{k}.{part} is {_show(old[k].get(part, _MISSING))} in the study, "
                           f"{_show(new[k].get(part, _MISSING))} here")
    return out


def check(study, current: dict[str, Any], where: str, uncounted=lambda t: False) -> None:
    """Refuse a sweep whose definition differs from the one the study recorded (call under the budget
    lock); record it when the study has none yet, or has only trials that `uncounted` lets go."""
    recorded = study.user_attrs.get(DEFINITION)
    if recorded == current:
        return
    trials = study.get_trials(deepcopy=False)
    if recorded is not None and any(not uncounted(t) for t in trials):
        diff = differences(recorded, current)
        if diff:
            more = f" (and {len(diff) - SHOWN} more)" if len(diff) > SHOWN else ""
            raise UserError(f"study {study.study_name!r} in {where} was run with other settings: "
                            f"{'; '.join(diff[:SHOWN])}{more}. Its trials and new ones would be ranked together: rerun "
                            f"with the study's settings, or start a separate study with --study NAME")
    study.set_user_attr(DEFINITION, current)


_MISSING = object()


def _one(metrics) -> str:
    return repr(metrics[0]) if isinstance(metrics, list) and len(metrics) == 1 else repr(metrics)


def _show(v) -> str:
    return "unset" if v is _MISSING else json.dumps(v)
