"""The sweep file of `litlab sweep SWEEP.yaml`: schema, validation, Optuna sampler/pruner, the space.

A sweep names a base experiment, fixed overrides, the metric(s) to optimise and an ordered space of
dotted experiment keys. `load_spec` checks it all before any trial runs, including that every space
value is valid for the experiment: `runner.load_config` (and the model's constructor, on the meta
device) at each bound and each choice. Mistakes raise UserError / ConfigError: one line, exit 2.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import optuna

from litlab.config import TOP_LEVEL, _yaml_load, flatten, parse_override
from litlab.errors import ConfigError, UserError, did_you_mean
from litlab.schema import Range, check
from litlab.sweep.values import canon, format_value, tidy, to_overrides

KEYS = ("name", "experiment", "overrides", "metric", "direction", "n_trials", "timeout", "sampler", "pruner",
        "storage", "heartbeat_interval", "grace_period", "max_retries", "space")
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler", "gp": "GPSampler",
            "qmc": "QMCSampler", "grid": "GridSampler", "nsga2": "NSGAIISampler"}
PRUNERS = {"none": "NopPruner", "median": "MedianPruner", "percentile": "PercentilePruner",
           "successive_halving": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner", "threshold": "ThresholdPruner"}
NEEDS = {"cmaes": ("cmaes",), "gp": ("scipy", "torch"), "qmc": ("scipy",)}  # packages Optuna imports lazily
DIRECTIONS = {"maximize": "maximize", "max": "maximize", "minimize": "minimize", "min": "minimize"}
PARAM_KEYS = {"float": ("low", "high", "log", "step"), "int": ("low", "high", "log", "step"), "categorical": ("choices",)}
Positive = Annotated[float, Range(gt=0)]


@dataclass
class ParamSpec:
    key: str  # dotted experiment key, also the Optuna param name
    type: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list | None = None
    when: dict[str, list] = field(default_factory=dict)  # parent key -> values that make this param active

    def active(self, values: dict[str, Any]) -> bool:
        return all(p in values and canon(values[p]) in map(canon, vs) for p, vs in self.when.items())

    def encoded_choices(self) -> list:
        """Optuna stores only None/bool/int/float/str choices: lists and mappings go as JSON strings."""
        return [c if isinstance(c, (str, int, float, bool, type(None))) else json.dumps(c) for c in self.choices or []]

    def decode(self, raw: Any) -> Any:
        return next(c for c, e in zip(self.choices, self.encoded_choices()) if canon(e) == canon(raw))

    def typical(self) -> Any:
        """A value inside the range (or the first choice): what the other params take while one is checked."""
        if self.type == "categorical":
            return self.choices[0]
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        mid = self.low + round((mid - self.low) / self.step) * self.step if self.step else mid
        return round(mid) if self.type == "int" else tidy(mid)

    def to_dict(self) -> dict[str, Any]:
        keep = ("choices",) if self.type == "categorical" else ("low", "high", "log", "step")
        return {k: copy.deepcopy(v) for k, v in dataclasses.asdict(self).items() if k in ("type", *keep) or (k == "when" and v)}


@dataclass
class SweepSpec:
    name: str
    path: Path
    experiment: Path
    overrides: list[str]
    metrics: list[str]
    directions: list[str]  # maximize | minimize, one per metric
    n_trials: int
    timeout: float | None
    sampler: dict  # {"name": ..., **kwargs of the Optuna class}
    pruner: dict
    space: list[ParamSpec]
    storage: str | None = None
    heartbeat_interval: float = 10.0
    grace_period: float = 30.0
    max_retries: int = 3

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    def to_dict(self) -> dict[str, Any]:
        """Plain data under the sweep file's own key names (metric, direction), plus the file's path."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "space"}
        d.update(path=str(self.path), experiment=str(self.experiment), metric=d.pop("metrics"), direction=d.pop("directions"))
        return {**d, "space": {p.key: p.to_dict() for p in self.space}}


# ------------------------------------------------------------------------------------ loading
def load_spec(path: str | Path, overrides: list[str] | None = None, classes: bool = True) -> SweepSpec:
    """Read, override (`n_trials=3`, `sampler.seed=1`, `space.optim.lr.high=0.5`) and validate a sweep
    (against the experiment's model and data classes too, unless `classes` is False: then only as
    `litlab run` checks before importing Lightning, see sweep/experiment_checks.py)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: {'is a directory, expected a' if p.is_dir() else 'no such'} sweep file")
    try:
        raw = _yaml_load(p.read_text(), str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping (experiment, metric, direction, space, ...), got {type(raw).__name__}")
    _not_an_experiment(raw, path)
    return _parse(_apply_overrides(raw, overrides or []), p, classes)


def _not_an_experiment(raw: dict, path: str | Path) -> None:
    """An experiment file given to `litlab sweep` (model:, data:, trainer: ... and no space:)."""
    experiment_keys = [k for k in raw if k in TOP_LEVEL and k not in KEYS]
    if experiment_keys and "space" not in raw and "experiment" not in raw:
        raise UserError(f"{path}: this is an experiment file (it has {', '.join(map(str, experiment_keys[:3]))}), not a "
                        f"sweep file: train it with `litlab run {path}`, or give `litlab sweep` a sweep file that names "
                        "it as its experiment (see sweeps/*.yaml)")


def _apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for key, value in map(parse_override, overrides):
        top, _, rest = key.partition(".")
        if top not in KEYS:
            raise ConfigError(key, f"unknown sweep key{did_you_mean(top, KEYS)}; allowed: {', '.join(KEYS)}")
        if top == "overrides" and rest:  # overrides.trainer.max_epochs=5: add or replace one fixed override
            raw[top] = [o for o in _override_list(raw.get(top) or []) if parse_override(o)[0] != rest] + to_overrides({rest: value})
            continue
        parts = [top, *rest.split(".")] if rest else [top]
        if top == "space" and rest and isinstance(raw.get("space") or {}, dict):
            raw["space"] = raw.get("space") or {}
            # space keys hold dots: space.optim.lr.high=0.5 -> ["space", "optim.lr", "high"],
            # space.optim.momentum.when.optim.name=sgd -> ["space", "optim.momentum", "when", "optim.name"]
            hit = max((k for k in raw["space"] if rest == k or rest.startswith(f"{k}.")), key=len, default=rest)
            parts = ["space", hit, *filter(None, rest[len(hit) + 1:].split(".", 1))]
        if top in ("sampler", "pruner") and isinstance(raw.get(top), str):
            raw[top] = {"name": raw[top]}  # `sampler: tpe` written as a name alone
        node = raw
        for part in parts[:-1]:
            node[part] = node[part] if isinstance(node.get(part), dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return raw


def _override_list(raw: Any) -> list[str]:
    if isinstance(raw, dict):  # {trainer.max_epochs: 10} or nested {trainer: {max_epochs: 10}}
        return to_overrides(flatten(raw))
    if not isinstance(raw, list) or not all(isinstance(o, str) for o in raw):
        raise ConfigError("overrides", f"expected a list of key=value strings or a mapping, got {raw!r}")
    try:
        [parse_override(o) for o in raw]
    except UserError as e:
        raise ConfigError("overrides", str(e)) from None
    return list(raw)


def _parse(raw: dict, path: Path, classes: bool = True) -> SweepSpec:
    for k in raw:
        if k not in KEYS:
            raise ConfigError(str(k), f"unknown sweep key{did_you_mean(str(k), KEYS)}; allowed: {', '.join(KEYS)}")
    for k in ("experiment", "metric", "direction", "space"):
        if raw.get(k) is None:
            raise ConfigError(k, "is required")
    name = check(raw.get("name", path.stem), str, "name")
    if not re.fullmatch(r"[\w.\-]+", name):
        raise ConfigError("name", f"{name!r}: use letters, digits, '_', '-' and '.' only")
    metrics, directions = ([raw[k]] if isinstance(raw[k], str) else raw[k] for k in ("metric", "direction"))
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) and m for m in metrics) \
            or len(set(metrics)) < len(metrics):
        raise ConfigError("metric", f"expected a metric name or a list of distinct names, got {raw['metric']!r}")
    for d in directions if isinstance(directions, list) else [directions]:
        if not isinstance(d, str) or d not in DIRECTIONS:
            raise ConfigError("direction", f"{d!r} is not allowed: choose maximize or minimize (or max, min)")
    if len(directions) != len(metrics):
        raise ConfigError("direction", f"gives {len(directions)} direction(s) for {len(metrics)} metric(s): one per metric")
    experiment = check(raw["experiment"], str, "experiment")
    found = [b / experiment for b in (path.resolve().parent, Path.cwd()) if (b / experiment).is_file()]  # sweep's dir first
    if not found:
        raise ConfigError("experiment", f"{experiment}: no such file (looked in {path.resolve().parent} and {Path.cwd()})")
    if not isinstance(raw["space"], dict) or not raw["space"]:
        raise ConfigError("space", "expected a non-empty mapping {dotted.key: {type: float|int|categorical, ...}}")
    space: dict[str, ParamSpec] = {}
    for key, body in raw["space"].items():
        space[str(key)] = _param(str(key), body, space, list(map(str, raw["space"])))
    spec = SweepSpec(
        name=name, path=path.resolve(), experiment=found[0].resolve(), overrides=_override_list(raw.get("overrides") or []),
        metrics=metrics, directions=[DIRECTIONS[d] for d in directions],
        n_trials=check(raw.get("n_trials", 20), Annotated[int, Range(ge=1)], "n_trials"),
        timeout=check(raw.get("timeout"), Positive | None, "timeout"),
        sampler=_component(raw.get("sampler") or "tpe", "sampler", SAMPLERS, optuna.samplers),
        pruner=_component(raw.get("pruner") or "none", "pruner", PRUNERS, optuna.pruners),
        space=list(space.values()), storage=check(raw.get("storage"), str | None, "storage"),
        heartbeat_interval=check(raw.get("heartbeat_interval", 10.0), Positive, "heartbeat_interval"),
        grace_period=check(raw.get("grace_period", 30.0), Positive, "grace_period"),
        max_retries=check(raw.get("max_retries", 3), Annotated[int, Range(ge=0)], "max_retries"))
    if spec.grace_period <= spec.heartbeat_interval:
        raise ConfigError("grace_period", f"must be greater than heartbeat_interval ({spec.heartbeat_interval}), "
                                          "or live trials count as dead")
    if spec.multi_objective and spec.pruner["name"] != "none":
        raise ConfigError("pruner.name", f"{spec.pruner['name']!r}: Optuna cannot prune multi-objective studies; use none")
    if spec.multi_objective and spec.sampler["name"] == "cmaes":
        raise ConfigError("sampler.name", "cmaes optimises one metric only; for several use nsga2, tpe, gp, random or qmc")
    for which, build in (("sampler", build_sampler), ("pruner", build_pruner)):
        try:  # the Optuna classes check their arguments' values
            build(spec)
        except (TypeError, ValueError) as e:
            raise ConfigError(which, f"{getattr(spec, which)['name']}: {str(e).strip().splitlines()[0]}") from None
    from litlab.sweep.experiment_checks import check_against_experiment

    check_against_experiment(spec, classes=classes)
    return spec


def _component(raw: Any, key: str, table: dict[str, str], module) -> dict:
    # a name alone, or a mapping whose name defaults to the table's first entry (tpe, none)
    body = {"name": raw} if isinstance(raw, str) else {"name": next(iter(table)), **raw} if isinstance(raw, dict) else raw
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise ConfigError(key, f"expected {{name: ..., ...arguments}} or a name, got {raw!r}")
    if (name := body["name"]) not in table:
        raise ConfigError(f"{key}.name", f"{name!r}{did_you_mean(name, table)}: choose one of {', '.join(table)}")
    for pkg in NEEDS.get(name, ()):
        if importlib.util.find_spec(pkg) is None:
            raise ConfigError(f"{key}.name", f"{name} needs the {pkg!r} package, which is not installed")
    # What a YAML file can give: the class's __init__ arguments but the grid's search_space (built from
    # the space) and the callables and objects (constraints_func, independent_sampler, mutation, ...).
    args = {n: p for n, p in inspect.signature(getattr(module, table[name]).__init__).parameters.items()
            if n not in ("self", "search_space") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and not re.search(r"Callable|Sampler|Mutation|Crossover|Trial", str(p.annotation))}
    for k in body:
        if k != "name" and k not in args:
            raise ConfigError(f"{key}.{k}", f"unknown argument for {key} {name!r}{did_you_mean(str(k), args)}; "
                                            f"allowed: {', '.join(args) or '(none)'}")
    for k in (k for k, p in args.items() if p.default is inspect.Parameter.empty and k not in body):
        raise ConfigError(f"{key}.{k}", f"is required for {key} {name!r}")
    if "seed" in body:
        check(body["seed"], Annotated[int, Range(ge=0, lt=2**32)] | None, f"{key}.seed")
    return dict(body)


def _param(key: str, body: Any, earlier: dict[str, ParamSpec], all_keys: list[str]) -> ParamSpec:
    at = f"space.{key}"
    if not isinstance(body, dict) or body.get("type") not in PARAM_KEYS:
        raise ConfigError(f"{at}.type", f"{body.get('type') if isinstance(body, dict) else body!r}: "
                                        "expected {type: float|int|categorical, ...}")
    kind, allowed = body["type"], ("type", *PARAM_KEYS[body["type"]], "when")
    for k in body:
        if k not in allowed:
            raise ConfigError(f"{at}.{k}", f"unknown key for type {kind}{did_you_mean(str(k), allowed)}; "
                                           f"allowed: {', '.join(allowed)}")
    when = body.get("when") or {}
    if not isinstance(when, dict):
        raise ConfigError(f"{at}.when", f"expected {{earlier.key: value or [values]}}, got {when!r}")
    when = {str(k): v if isinstance(v, list) and v else [v] for k, v in when.items()}
    for parent, values in when.items():
        if parent not in earlier:
            hint = "it must come before this param in the space" if parent in all_keys else \
                f"not a param of the space{did_you_mean(parent, [k for k in all_keys if k != key])}"
            raise ConfigError(f"{at}.when.{parent}", f"{hint}; params before it: {', '.join(earlier) or '(none)'}")
        if earlier[parent].type != "categorical":
            raise ConfigError(f"{at}.when.{parent}", f"can only test a categorical param, not {earlier[parent].type}")
        for v in values:
            if canon(v) not in map(canon, earlier[parent].choices):
                raise ConfigError(f"{at}.when.{parent}", f"{v!r} is not among its choices: "
                                                         f"{', '.join(map(format_value, earlier[parent].choices))}")
    if kind == "categorical":
        p = ParamSpec(key, kind, choices=body.get("choices"), when=when)
        if not isinstance(p.choices, list) or not p.choices:
            raise ConfigError(f"{at}.choices", f"needs a non-empty list of values, got {p.choices!r}")
        if len(set(map(canon, p.encoded_choices()))) < len(p.choices):
            raise ConfigError(f"{at}.choices", "has duplicates (a list choice counts as its JSON string)")
        return p
    num = int if kind == "int" else float
    for k in ("low", "high"):
        if k not in body:
            raise ConfigError(f"{at}.{k}", f"is required for type {kind}")
        if not math.isfinite(check(body[k], num, f"{at}.{k}")):
            raise ConfigError(f"{at}.{k}", "must be finite")
    step = None if body.get("step") is None else check(body["step"], num, f"{at}.step")
    p = ParamSpec(key, kind, check(body["low"], num, at), check(body["high"], num, at),
                  check(body.get("log", False), bool, f"{at}.log"), step, when=when)
    if p.low >= p.high:
        raise ConfigError(at, f"low ({p.low}) must be < high ({p.high})")
    if p.log and p.low <= 0:
        raise ConfigError(f"{at}.low", f"{p.low} must be > 0 with log: true")
    if step is not None and p.log:
        raise ConfigError(f"{at}.step", "cannot be combined with log: true (Optuna samples on a log scale or a grid)")
    n = (p.high - p.low) / step if step and step > 0 else 1
    if step is not None and (step <= 0 or abs(n - round(n)) > 1e-9 * n):
        raise ConfigError(f"{at}.step", f"{step} must be > 0 and divide high - low = {tidy(p.high - p.low)}")
    return p


# ------------------------------------------------------------------------------------ Optuna
def build_sampler(spec: SweepSpec, *, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler of the spec. Give a `seed_offset` (e.g. the trial number) when each trial builds its
    sampler in a fresh process: with one seed, all would draw the same random (start-up) params."""
    kw = {k: v for k, v in spec.sampler.items() if k != "name"}
    if kw.get("seed") is not None:
        kw["seed"] = (kw["seed"] + seed_offset) % 2**32
    if spec.sampler["name"] == "tpe":
        # multivariate TPE models the params jointly (better than independent TPE); group=True makes
        # it work on conditional spaces: one joint model per set of params that occur together (adam
        # trials; sgd trials with momentum), where plain multivariate falls back to independent
        # sampling for every param missing from some trial.
        kw = {"multivariate": True, "group": True, **kw}
    if spec.sampler["name"] == "grid":
        kw["search_space"] = grid_space(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return getattr(optuna.samplers, SAMPLERS[spec.sampler["name"]])(**kw)


def grid_space(spec: SweepSpec) -> dict[str, list]:
    """{key: values} of the grid sampler: categorical choices (encoded), ints, floats with a step."""
    out = {}
    for p in spec.space:
        if p.type == "float" and not p.step:
            raise ConfigError(f"space.{p.key}", "the grid sampler needs discrete params: give this float a step")
        out[p.key] = p.encoded_choices() if p.type == "categorical" else list(range(p.low, p.high + 1, p.step or 1)) \
            if p.type == "int" else [tidy(p.low + i * p.step) for i in range(round((p.high - p.low) / p.step) + 1)]
    return out


def build_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    kw = {k: v for k, v in spec.pruner.items() if k != "name"}
    return getattr(optuna.pruners, PRUNERS[spec.pruner["name"]])(**kw)


def suggest(trial: optuna.trial.BaseTrial, spec: SweepSpec) -> dict[str, Any]:
    """Define-by-run in space order; a conditional param is asked only when its parents allow it.
    Returns {dotted key: value} of the active params (list choices decoded from their JSON)."""
    values: dict[str, Any] = {}
    for p in (p for p in spec.space if p.active(values)):
        if p.type == "float":
            value = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
            # Optuna's grid point low + k * step may be 0.30000000000000004: the run gets 0.3
            values[p.key] = tidy(value) if p.step else value
        elif p.type == "int":
            values[p.key] = trial.suggest_int(p.key, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            values[p.key] = p.decode(trial.suggest_categorical(p.key, p.encoded_choices()))
    return values


def objective_overrides(spec: SweepSpec) -> list[str]:
    """Make the checkpoint (hence the test on the best checkpoint) follow the first objective, when
    it is a train/ or val/ metric and the sweep's overrides do not choose the monitor themselves."""
    metric, fixed = spec.metrics[0], {parse_override(o)[0] for o in spec.overrides}
    if not metric.startswith(("val/", "train/")) or "callbacks.checkpoint.monitor" in fixed:
        return []
    mode = {} if "callbacks.checkpoint.mode" in fixed else \
        {"callbacks.checkpoint.mode": "max" if spec.directions[0] == "maximize" else "min"}
    return to_overrides({"callbacks.checkpoint.monitor": metric, **mode})
