"""Experiment configs: load YAML, apply dotted overrides, validate, resolve.

Flow: YAML file -> dict -> overrides (`optim.lr=0.01`) -> `validate()` -> a resolved `Config` whose
`to_dict()` holds every default, so two runs can be compared key by key. The same dotted keys work
in YAML, on the command line and in a sweep space. Every mistake raises `ConfigError` naming the key
and what is allowed; the CLI shows it as one line with exit status 2.

Fixed sections (trainer, optim, callbacks, tracking) are typed dataclasses. The `model` and `data`
sections are checked against the registered class's `__init__` signature (its annotations and
defaults are the schema, as in LightningCLI).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from litlab.errors import ConfigError, UserError, did_you_mean, unknown_argument
from litlab.schema import Range, check, type_name

PositiveInt = Annotated[int, Range(ge=1)]


@dataclass
class SchedulerConfig:
    # none | step (x gamma every step_size epochs) | cosine | warmup_cosine (linear warmup then cosine)
    name: Literal["none", "step", "cosine", "warmup_cosine"] = "none"
    step_size: Annotated[int, Range(ge=1, le=100_000)] = 10
    gamma: Annotated[float, Range(gt=0, le=1)] = 0.1
    warmup_epochs: Annotated[float, Range(ge=0, le=100_000)] = 0.0
    min_lr: Annotated[float, Range(ge=0)] = 0.0


@dataclass
class OptimConfig:
    name: Literal["sgd", "rmsprop", "adam", "adamw"] = "adam"
    lr: Annotated[float, Range(gt=0, le=10)] = 1e-3
    weight_decay: Annotated[float, Range(ge=0, le=10)] = 0.0
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.0  # sgd, rmsprop
    nesterov: bool = False  # sgd, needs momentum > 0
    betas: tuple[Annotated[float, Range(ge=0, lt=1)], Annotated[float, Range(ge=0, lt=1)]] = (0.9, 0.999)
    eps: Annotated[float, Range(gt=0, le=1)] = 1e-8
    alpha: Annotated[float, Range(gt=0, lt=1)] = 0.99  # rmsprop smoothing constant
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class TrainerConfig:
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: Annotated[int, Range(ge=1, le=1024)] | Literal["auto"] = 1
    num_nodes: Annotated[int, Range(ge=1, le=10_000)] = 1
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_fork", "fsdp"] = "auto"
    precision: Literal["32", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "64"] = "32"
    max_epochs: Annotated[int, Range(ge=1, le=1_000_000)] = 10
    max_steps: Annotated[int, Range(ge=-1)] = -1
    gradient_clip_val: Annotated[float, Range(gt=0)] | None = None
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"
    accumulate_grad_batches: Annotated[int, Range(ge=1, le=100_000)] = 1
    deterministic: bool = False
    benchmark: bool | None = None
    log_every_n_steps: Annotated[int, Range(ge=1)] = 10
    check_val_every_n_epoch: Annotated[int, Range(ge=1)] = 1
    val_check_interval: Annotated[float, Range(gt=0)] | None = None
    limit_train_batches: Annotated[float, Range(gt=0)] | None = None
    limit_val_batches: Annotated[float, Range(ge=0)] | None = None
    limit_test_batches: Annotated[float, Range(gt=0)] | None = None
    num_sanity_val_steps: Annotated[int, Range(ge=-1)] = 0
    fast_dev_run: bool | Annotated[int, Range(ge=0)] = False
    enable_progress_bar: bool = True
    skip_nonfinite: bool = False  # skip a step whose loss/gradients are NaN/inf (else: stop the run FAILED)
    # speed (README "Performance"): none of these changes what is computed, except compile's and
    # TF32's rounding of float32 matrix products
    fast_loop: bool = True  # litlab's lean training step where it computes exactly what Lightning's does
    compile: bool = False  # torch.compile the model's `net` (static shapes) before training
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # reduce-overhead: CUDA graphs
    matmul_precision: Literal["highest", "high", "medium"] = "high"  # GPU float32 matmuls: high = TF32 tensor cores
    channels_last: bool | None = None  # NHWC weights for 2-D convolutions; None: on a GPU only


@dataclass
class CheckpointConfig:
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    save_top_k: Annotated[int, Range(ge=-1)] = 1
    every_n_train_steps: Annotated[int, Range(ge=1)] | None = None  # also save last.ckpt mid-epoch
    dirpath: str = "mlruns/checkpoints"  # <dirpath>/<run_id>/{best,last}.ckpt


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    monitor: str | None = None  # default: callbacks.checkpoint.monitor
    mode: Literal["min", "max"] | None = None
    patience: Annotated[int, Range(ge=1)] = 5
    min_delta: Annotated[float, Range(ge=0)] = 0.0


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    lr_monitor: bool = True


@dataclass
class TrackingConfig:
    mlflow: bool = True
    tracking_uri: str | None = None  # default: --tracking-uri, MLFLOW_TRACKING_URI, sqlite:///mlruns/mlflow.db
    experiment: str | None = None  # MLflow experiment; default: the config's name
    run_name: str | None = None
    wandb: Literal["off", "offline", "online"] = "off"
    wandb_project: str = "litlab"
    system_metrics: bool = True
    system_metrics_interval: Annotated[float, Range(ge=1, le=3600)] = 10.0
    flush_interval: Annotated[float, Range(gt=0, le=3600)] = 5.0  # seconds between metric batches
    flush_timeout: Annotated[float, Range(ge=0, le=86400)] = 30.0  # at the end: wait this long for an unreachable server
    log_checkpoints: bool = True  # upload best and last checkpoints as artifacts


SECTIONS: dict[str, type] = {
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "callbacks": CallbacksConfig,
    "tracking": TrackingConfig,
}
TOP_LEVEL = ("name", "description", "seed", "model", "data", *SECTIONS)


@dataclass
class Config:
    """A validated, fully resolved experiment config."""

    name: str
    seed: int
    model: dict[str, Any]  # {"name": ..., **args}, args resolved against the model's signature
    data: dict[str, Any]
    optim: OptimConfig
    trainer: TrainerConfig
    callbacks: CallbacksConfig
    tracking: TrackingConfig
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "model": copy.deepcopy(self.model),
            "data": copy.deepcopy(self.data),
            **{k: _plain(dataclasses.asdict(getattr(self, k))) for k in SECTIONS},
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def identity_hash(self) -> str:
        """Hash of what defines the trained weights (seed, model, data, optim); stored in every
        checkpoint. Trainer/tracking keys (e.g. max_epochs on resume) may change without it."""
        ident = {k: v for k, v in self.to_dict().items() if k in ("seed", "model", "data", "optim")}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _plain(x):
    if isinstance(x, tuple):
        return [_plain(v) for v in x]
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


# ---------------------------------------------------------------- YAML with sane numbers
class _Loader(yaml.SafeLoader):
    """PyYAML (YAML 1.1) reads `1e-3` as a string; accept every float Python accepts."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\.inf|\.Inf|\.INF|\.nan)$"),
    list("-+0123456789."),
)


def _yaml_load(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: malformed YAML{at}: {problem}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such experiment file")
    if p.is_dir():
        raise UserError(f"{path}: is a directory, expected an experiment YAML file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    data = _yaml_load(text, str(path))
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections (name, model, data, ...), got {type(data).__name__}")
    return data


# ---------------------------------------------------------------- dotted overrides
def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=0.01` -> ("optim.lr", 0.01); values are YAML (`[256,128]`, `true`, `null`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise UserError(f"bad override {text!r}: expected key=value with a dotted key, e.g. optim.lr=0.01")
    return key, _yaml_load(raw, f"override {key}") if raw.strip() else ""


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[0] not in TOP_LEVEL:
        raise ConfigError(key, f"unknown section {parts[0]!r}{did_you_mean(parts[0], TOP_LEVEL)}; "
                          f"allowed: {', '.join(TOP_LEVEL)}")
    node = cfg
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is {nxt!r}, not a section: cannot set {key}")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(cfg: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for key, value in items:
        set_dotted(cfg, key, value)
    return cfg


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------- validation
def _build_dataclass(cls: type, raw: Any, key: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(key, f"expected a section (mapping), got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls, include_extras=True)
    for k in raw:
        if k not in fields:
            raise ConfigError(f"{key}.{k}", f"unknown key{did_you_mean(str(k), fields)}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build_dataclass(tp, raw[name], f"{key}.{name}")
        else:
            kwargs[name] = check(raw[name], tp, f"{key}.{name}")
    return cls(**kwargs)


def signature_schema(cls: type, skip: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """{arg: (type, default)} from `cls.__init__`; default is inspect.Parameter.empty if required."""
    sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    out = {}
    for name, p in sig.parameters.items():
        if name == "self" or name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = (hints.get(name, typing.Any), p.default)
    return out


def resolve_args(section: str, cls: type, raw: dict[str, Any], provided: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check `raw` against cls.__init__; fill defaults; values in `provided` (e.g. the data's
    num_classes) fill arguments the user did not set."""
    schema = signature_schema(cls)
    for k in raw:
        if k not in schema:
            raise unknown_argument(section, cls.registry_name, k, list(schema))
    out = {}
    for name, (tp, default) in schema.items():
        if name in raw:
            out[name] = check(raw[name], tp, f"{section}.{name}")
        elif provided and name in provided:
            out[name] = provided[name]
        elif default is inspect.Parameter.empty:
            raise ConfigError(f"{section}.{name}", f"is required for {section}.name={cls.registry_name!r} ({type_name(tp)})")
        else:
            out[name] = _plain(default)
    return out


def validate(raw: dict[str, Any], data_info: typing.Callable[[type, dict], dict] | None = None) -> Config:
    """Validate a raw config dict into a resolved Config.

    `data_info(data_cls, data_args)` returns what the data tells the model (input_shape,
    num_classes, ...); the runner passes it so that model args the user left out are filled in.
    """
    from litlab import registry

    head = precheck(raw)
    data_entry = registry.get_data(raw["data"]["name"])
    data_args = resolve_args("data", data_entry.cls, {k: v for k, v in raw["data"].items() if k != "name"})
    model_entry = registry.get_model(raw["model"]["name"])
    provided = data_info(data_entry.cls, data_args) if data_info else {}
    model_args = resolve_args("model", model_entry.cls, {k: v for k, v in raw["model"].items() if k != "name"}, provided)
    return Config(model={"name": model_entry.name, **model_args}, data={"name": data_entry.name, **data_args}, **head)


def precheck(raw: Any) -> dict[str, Any]:
    """All that validate() checks without the model and data registries (they import torch and
    Lightning, ~10 s): the sections, name, seed, that model and data name something, and litlab's own
    sections (optim, trainer, callbacks, tracking) with their cross-checks. `litlab run` calls it
    before that import, so a typo there is one line at once. Returns Config's other fields."""
    if not isinstance(raw, dict):
        raise UserError(f"expected a mapping of sections, got {type(raw).__name__}")
    for k in raw:
        if k not in TOP_LEVEL:
            raise ConfigError(str(k), f"unknown section{did_you_mean(str(k), TOP_LEVEL)}; allowed: {', '.join(TOP_LEVEL)}")
    name = check(raw.get("name", "experiment"), str, "name")
    if not re.fullmatch(r"[\w.\-]+", name):
        raise ConfigError("name", f"{name!r}: use letters, digits, '_', '-' and '.' only")
    seed = check(raw.get("seed", 0), Annotated[int, Range(ge=0, lt=2**32)], "seed")
    for sec in ("model", "data"):
        body = raw.get(sec)
        if not isinstance(body, dict):
            raise ConfigError(sec, f"missing or not a section: expected {sec}: {{name: ..., ...args}}")
        if "name" not in body:
            raise ConfigError(f"{sec}.name", "is required")
    typed = {sec: _build_dataclass(cls, raw.get(sec), sec) for sec, cls in SECTIONS.items()}
    _cross_checks(**typed)
    return dict(name=name, description=check(raw.get("description", ""), str, "description"), seed=seed, **typed)


def _cross_checks(optim: OptimConfig, trainer: TrainerConfig, callbacks: CallbacksConfig, **_) -> None:
    if optim.nesterov and (optim.name != "sgd" or optim.momentum <= 0):
        raise ConfigError("optim.nesterov", "needs optim.name=sgd and optim.momentum > 0")
    if trainer.compile_mode != "default" and not trainer.compile:
        raise ConfigError("trainer.compile_mode", f"{trainer.compile_mode!r} is only used with trainer.compile=true")
    es = callbacks.early_stopping
    if es.enabled and es.mode is None and es.monitor not in (None, callbacks.checkpoint.monitor):
        raise ConfigError("callbacks.early_stopping.mode", "set it (min or max) when monitoring a different metric")


def load(path: str | Path | dict, overrides: list[str] | dict | None = None, data_info=None) -> Config:
    return validate(load_raw(path, overrides), data_info)


def load_raw(path: str | Path | dict, overrides: list[str] | dict | None = None) -> dict[str, Any]:
    """The YAML file (or dict) with the dotted overrides applied, not validated yet."""
    raw = path if isinstance(path, dict) else load_yaml(path)
    return apply_overrides(raw, overrides or [])
