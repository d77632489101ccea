"""The one place that builds a Trainer: `run(config) -> RunResult`.

The CLI, the notebook API, the tests and the sweep objective all call `run()` (or `resume()`).
It validates the config, seeds everything, builds datamodule + model + trainer, tracks the run in
MLflow (and W&B when asked), fits, tests on the best checkpoint, uploads checkpoints and a learning
curve, and ends the run FINISHED / FAILED / KILLED, never leaving it RUNNING on an error.

Under DDP (`trainer.strategy=ddp`) Lightning re-launches this same command once per extra rank;
only rank 0 talks to the trackers. Rank 0 passes its run id to the other ranks through the
LITLAB_RUN_ID environment variable, so every rank writes to the same checkpoint directory.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities import rank_zero_only

from litlab import config as config_mod
from litlab import registry, tracking
from litlab.checkpointing import (AtomicCheckpointIO, RunMetadata, checkpoint_callbacks, find_last_checkpoint,
                                  read_resume_point)
from litlab.early_checks import refuse_sweep_parent
from litlab.guards import NonFiniteGuard
from litlab.monitor_check import CheckedEarlyStopping
from litlab.resume_state import ExactResume
from litlab.run_io import close_failed, finish_run, finish_wandb, start_system_metrics, wandb_logger
from litlab.provenance import device_description, git_info, process_alive, version_tags
from litlab.config import Config
from litlab.errors import ConfigError, UserError

RUN_ID_ENV = "LITLAB_RUN_ID"

# Lightning 2.6 on torch 2.13 warns about its own internal use of a deprecated torch API on every fit.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


@dataclass
class RunResult:
    run_id: str
    status: str  # FINISHED | FAILED | KILLED
    metrics: dict[str, float] = field(default_factory=dict)  # test metrics
    best_score: float | None = None  # best value of callbacks.checkpoint.monitor
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    config: Config | None = None


@dataclass
class ResumeFrom:
    run_id: str
    checkpoint: Path


def _data_info(data_cls: type, data_args: dict[str, Any]) -> dict[str, Any]:
    info = data_cls(**data_args).info()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in info.items()}


def load_config(source: str | Path | dict, overrides: list[str] | dict | None = None) -> Config:
    """YAML path or dict + dotted overrides -> validated Config (raises UserError)."""
    return config_mod.load(source, overrides, data_info=_data_info)


def _rank() -> int:
    return int(getattr(rank_zero_only, "rank", 0))


def run(source: str | Path | dict | Config, overrides: list[str] | dict | None = None, *,
        tracking_uri: str | None = None, resume_from: ResumeFrom | None = None,
        callbacks: list | None = None, parent_run_id: str | None = None,
        extra_tags: dict[str, str] | None = None, verbose: bool = False, run_name: str | None = None,
        experiment: str | None = None, quiet: bool = False) -> RunResult:
    """Train, validate and test one experiment, tracked; `quiet` drops Lightning's chatter (model
    summary, progress bar, info lines), e.g. inside sweep trials."""
    if quiet:
        import logging

        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    cfg = source if isinstance(source, Config) else load_config(source, overrides)
    if run_name:
        cfg.tracking.run_name = run_name
    if experiment:
        cfg.tracking.experiment = experiment
    source_dir = Path(source).resolve().parent if isinstance(source, (str, Path)) else Path.cwd()
    rank = _rank()
    uri = (tracking.resolve_tracking_uri(tracking_uri or cfg.tracking.tracking_uri) if cfg.tracking.mlflow
           else tracking_uri or cfg.tracking.tracking_uri or "")  # untracked: the URI is unused
    use_mlflow = cfg.tracking.mlflow
    model_entry = registry.get_model(cfg.model["name"])
    data_entry = registry.get_data(cfg.data["name"])

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = data_entry.cls(**_args(cfg.data))
    model = model_entry.cls(**_args(cfg.model))
    model.optim_config = cfg.optim
    config_hash = cfg.identity_hash()

    # ---- run identity: rank 0 creates (or re-attaches to) the run; other ranks inherit its id
    last_steps: dict[str, int] = {}
    run_id = None
    created = False
    if rank != 0:
        run_id = os.environ.get(RUN_ID_ENV) or uuid.uuid4().hex
    elif resume_from is not None:
        run_id = resume_from.run_id
    if resume_from is not None:
        ckpt_dir = resume_from.checkpoint.parent.resolve()
    else:
        ckpt_dir = None
    if rank == 0:  # a full or unwritable disk: one line now, before a run exists
        from litlab.preflight import check_run_dirs
        from litlab.spool import default_spool_dir

        check_run_dirs(ckpt_dir.parent if ckpt_dir else cfg.callbacks.checkpoint.dirpath, default_spool_dir())
    tags = _tags(cfg, model_entry, source_dir)
    if rank == 0 and use_mlflow:
        if resume_from is None:
            run_id = tracking.start_run(
                uri, cfg.tracking.experiment or cfg.name, cfg.tracking.run_name or _run_name(cfg),
                config_mod.flatten(cfg.to_dict()), {**tags, **(extra_tags or {})}, cfg.to_yaml(),
                parent_run_id=parent_run_id)
            created = True
        else:
            last_steps = _attach(uri, cfg, run_id, tags)
    run_id = run_id or uuid.uuid4().hex
    ckpt_dir = ckpt_dir or (Path(cfg.callbacks.checkpoint.dirpath) / run_id).resolve()
    if rank == 0 and use_mlflow:
        tracking.set_tags(uri, run_id, {"litlab.checkpoint_dir": str(ckpt_dir)})

    tracker = sysmon = trainer = None
    fit_started = False
    previous_env = os.environ.get(RUN_ID_ENV)
    loggers: list = []
    try:
        if use_mlflow:
            tracker = tracking.MlflowTracker(uri, run_id, cfg.tracking.flush_interval, last_steps,
                                               flush_timeout=cfg.tracking.flush_timeout)
            loggers.append(tracker)
        if cfg.tracking.wandb != "off":
            loggers.append(wandb_logger(cfg, run_id))
        ck = cfg.callbacks.checkpoint
        best_cb, last_cb = checkpoint_callbacks(ckpt_dir, ck.monitor, ck.mode, ck.save_top_k, ck.every_n_train_steps)
        cbs = [RunMetadata(run_id, config_hash, cfg.to_dict()), ExactResume(),
               NonFiniteGuard(skip=cfg.trainer.skip_nonfinite, check_every=cfg.trainer.log_every_n_steps), best_cb, last_cb, *_optional_callbacks(cfg, loggers),
               *(callbacks or [])]
        if rank == 0 and verbose:
            what = "resuming" if resume_from else "started"
            cbs.append(_Announce(f"litlab: {what} run {run_id} (experiment {cfg.tracking.experiment or cfg.name}, "
                                 f"{uri if use_mlflow else 'not tracked'})"))
        trainer = _build_trainer(cfg, loggers, cbs, ckpt_dir, quiet)
        _speed_settings(cfg, model, trainer)
        if rank == 0 and use_mlflow:
            tracking.set_tags(uri, run_id, {"device": device_description(trainer)})
            sysmon = start_system_metrics(cfg, uri, run_id, resumed=resume_from is not None)

        os.environ[RUN_ID_ENV] = run_id
        fit_started = True
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume_from.checkpoint) if resume_from else None)
        best_path = best_cb.best_model_path or None
        test_out = trainer.test(model, datamodule=datamodule, ckpt_path=best_path, verbose=False)
        metrics = {k: float(v) for k, v in (test_out[0] if test_out else {}).items()}
        reached = True
        best_score = float(best_cb.best_model_score) if best_cb.best_model_score is not None else None
        last_path = str(ckpt_dir / "last.ckpt") if (ckpt_dir / "last.ckpt").exists() else None
        if rank == 0 and use_mlflow:
            log_best_score(tracker, best_cb.monitor, best_score, trainer.global_step)
            sysmon, reached = None, finish_run(uri, run_id, cfg, tracker, sysmon, best_path, last_path)
        return RunResult(run_id, "FINISHED", metrics, best_score, best_path, last_path, uri,
                         _experiment_id(uri, run_id) if use_mlflow and rank == 0 and reached else None, cfg)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)) and use_mlflow:  # for the CLI's last line
            e.litlab_run_id, e.litlab_resumable = run_id, (ckpt_dir / "last.ckpt").exists()
        if rank == 0 and use_mlflow:
            # A config mistake found before any optimiser step (e.g. in configure_optimizers) is not
            # an experiment: remove the run rather than leave a FAILED husk.
            untrained = not fit_started or (trainer is not None and trainer.global_step == 0)
            close_failed(uri, run_id, e, tracker, sysmon, delete=created and untrained)
        raise
    finally:
        if tracker is not None:
            tracker.close()  # its sender thread ends with the run
        finish_wandb(loggers)
        if previous_env is None:
            os.environ.pop(RUN_ID_ENV, None)
        else:
            os.environ[RUN_ID_ENV] = previous_env


def resume(run_id: str, overrides: list[str] | dict | None = None, *, tracking_uri: str | None = None,
           verbose: bool = False, callbacks: list | None = None) -> RunResult:
    """Continue RUN_ID from its last checkpoint in the same MLflow run (same id, steps continue)."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    run_info = tracking.find_run(uri, run_id)
    tags = run_info.data.tags
    if _rank() == 0 and run_info.info.status == "RUNNING" and process_alive(tags.get("host"), tags.get("litlab.pid")):
        raise UserError(f"run {run_id} is still running (pid {tags.get('litlab.pid')}); stop it before resuming")
    from litlab import spool

    if spool.MetricSpool(spool.default_spool_dir(), run_id).path.exists():
        spool.sync(uri, run_id)  # what the previous process could not send: no gap in the history
    refuse_sweep_parent(run_id, tags)
    ckpt = find_last_checkpoint(uri, run_id, tags.get("litlab.checkpoint_dir"))
    if ckpt is None:
        raise UserError(f"run {run_id} has no last.ckpt to resume from (looked in "
                        f"{tags.get('litlab.checkpoint_dir') or 'no checkpoint dir'} and its artifacts)")
    # the run's own checkpoint directory (its tag, written by litlab) is trusted wherever it is
    own_dir = tags.get("litlab.checkpoint_dir")
    meta, trained = read_resume_point(ckpt, trusted=bool(own_dir) and Path(ckpt).resolve().parent == Path(own_dir).resolve())
    if meta.get("run_id") != run_id:
        raise UserError(f"{ckpt} belongs to run {meta.get('run_id')}, not {run_id}")
    cfg = load_config(meta["config"], overrides)
    if cfg.identity_hash() != meta["config_hash"]:
        raise UserError("resume: these overrides change the model, data, optimiser or seed (config hash "
                        f"{cfg.identity_hash()} != checkpoint's {meta['config_hash']}); resume only continues "
                        "training (e.g. trainer.max_epochs=...): start a new run with `litlab run` instead")
    _check_epochs_left(run_id, cfg.trainer.max_epochs, trained, finished=run_info.info.status == "FINISHED")
    return run(cfg, tracking_uri=uri, resume_from=ResumeFrom(run_id, ckpt), verbose=verbose, callbacks=callbacks)


# ------------------------------------------------------------------------------------ helpers
def _check_epochs_left(run_id: str, max_epochs: int | None, trained: int, finished: bool) -> None:
    """A resume must have epochs to train, unless it finishes a run stopped after its fit (then it
    only tests); before the Trainer is built, so a finished run keeps its status."""
    if max_epochs is None or max_epochs < 0 or max_epochs > trained or (max_epochs == trained and not finished):
        return
    raise UserError(f"trainer.max_epochs: run {run_id} has trained {trained} epochs already; give more than "
                    f"{trained} to train it further (e.g. trainer.max_epochs={trained * 2})")


class _Announce(Callback):
    """Prints the run id once training really starts (after the optimiser was configured), so a
    user who must resume a killed run has its id, and a config error shows as its one line alone."""

    def __init__(self, message: str):
        self.message = message

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            print(self.message, file=sys.stderr, flush=True)


def _args(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k != "name"}


def _run_name(cfg: Config) -> str:
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _tags(cfg: Config, model_entry, source_dir: Path) -> dict[str, str]:
    ck = cfg.callbacks.checkpoint
    return {
        "litlab.model": cfg.model["name"],
        "litlab.chapter": model_entry.chapter,
        "litlab.data": cfg.data["name"],
        "litlab.config_hash": cfg.identity_hash(),
        "litlab.monitor": ck.monitor,
        "litlab.mode": ck.mode,
        **git_info(source_dir),
        **version_tags(),
    }


def _attach(uri: str, cfg: Config, run_id: str, tags: dict[str, str]) -> dict[str, int]:
    prev = tracking.client(uri).get_run(run_id).data.tags
    n = int(prev.get("litlab.resumes", "0")) + 1
    steps = tracking.attach_run(uri, run_id, {**{k: v for k, v in tags.items() if not k.startswith("git.")},
                                              "litlab.resumes": str(n)}, config_mod.flatten(cfg.to_dict()))
    from litlab.redaction import redact

    tracking.client(uri).log_text(run_id, redact(cfg.to_yaml()), f"config/resolved_resume{n}.yaml")
    if "litlab.failure_reason" in prev:  # why the last attempt stopped: not this one's
        tracking.client(uri).delete_tag(run_id, "litlab.failure_reason")
    return steps


def _optional_callbacks(cfg: Config, loggers: list) -> list:
    out = []
    if cfg.callbacks.lr_monitor and loggers:
        out.append(LearningRateMonitor(logging_interval="epoch"))
    es = cfg.callbacks.early_stopping
    if es.enabled:
        out.append(CheckedEarlyStopping(monitor=es.monitor or cfg.callbacks.checkpoint.monitor,
                                 mode=es.mode or cfg.callbacks.checkpoint.mode, patience=es.patience,
                                 min_delta=es.min_delta))
    return out


def log_best_score(tracker, monitor: str | None, score: float | None, step: int) -> None:
    """`best/<monitor>`: the best value of the monitored metric (the best checkpoint's), so that
    runs compare, sort and plot by it (litlab compare, litlab runs, the MLflow UI)."""
    if monitor and score is not None and math.isfinite(score):
        tracker.log_metrics({f"best/{monitor}": score}, step=step)


def _build_trainer(cfg: Config, loggers: list, callbacks: list, ckpt_dir: Path, quiet: bool = False):
    t = cfg.trainer
    # -- progress display (litlab/progress.py): rich bar on a terminal, one line per epoch otherwise, none if quiet
    from litlab import progress

    shown = progress.progress_callbacks(t.enable_progress_bar and not quiet, sys.stderr.isatty())
    callbacks = [*callbacks, *shown]
    if not quiet:
        from litlab.model_summary import RunModelSummary

        callbacks.append(RunModelSummary())
    # --
    optional = {k: getattr(t, k) for k in ("val_check_interval", "limit_train_batches", "limit_val_batches",
                                          "limit_test_batches", "gradient_clip_val", "benchmark")
                if getattr(t, k) is not None}
    try:
        trainer = L.Trainer(
            accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
            precision=t.precision, max_epochs=t.max_epochs, max_steps=t.max_steps,
            gradient_clip_algorithm=t.gradient_clip_algorithm if t.gradient_clip_val else None,
            accumulate_grad_batches=t.accumulate_grad_batches, deterministic=t.deterministic,
            log_every_n_steps=t.log_every_n_steps, check_val_every_n_epoch=t.check_val_every_n_epoch,
            num_sanity_val_steps=t.num_sanity_val_steps, fast_dev_run=t.fast_dev_run,
            enable_progress_bar=progress.has_bar(shown),
            enable_model_summary=False,  # litlab's own table (RunModelSummary above), unless quiet
            logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
            default_root_dir=str(ckpt_dir), profiler=NoProfiler(), **optional)
    except (MisconfigurationException, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"trainer: {first}") from None
    if t.fast_loop:
        from litlab import fast_loop

        fast_loop.install(trainer)
    return trainer


def _speed_settings(cfg: Config, model, trainer) -> None:
    """Device settings and model preparation of trainer.{matmul_precision, benchmark, channels_last,
    compile} (README "Performance")."""
    import torch

    t = cfg.trainer
    on_gpu = trainer.strategy.root_device.type == "cuda"
    if on_gpu:
        torch.set_float32_matmul_precision(t.matmul_precision)  # high: TF32 tensor cores for float32 matmuls
        if t.benchmark is None and not t.deterministic:
            torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks the fastest convolution once
    convs = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    if convs and (t.channels_last if t.channels_last is not None else on_gpu):
        model.to(memory_format=torch.channels_last)  # NHWC kernels of cuDNN; inputs follow at the first conv
    if t.compile:
        net = getattr(model, "net", None)
        if not isinstance(net, torch.nn.Module):
            raise ConfigError("trainer.compile", f"model {cfg.model['name']!r} has no `net` module to compile")
        # the net's forward, in place: its state_dict keys stay the same (torch.compile(net) would prefix
        # them with _orig_mod.; in torch 2.13 nn.Module.compile() leaves a Sequential uncompiled);
        # dynamic=False: one graph per input shape (the full batch, the epoch's last one)
        net.forward = torch.compile(net.forward, dynamic=False, mode=None if t.compile_mode == "default" else t.compile_mode)
        trainer.callbacks.append(_EagerAfterFit(net))


class _EagerAfterFit(Callback):
    """trainer.compile is for the training steps: after fit, the net's own forward again, before the
    module's on_fit_end (GPT sampling: one new shape per token would recompile) and the test."""

    def __init__(self, net):
        self.net = net

    def on_fit_end(self, trainer, pl_module):
        self.net.__dict__.pop("forward", None)


class NoProfiler(PassThroughProfiler):
    """Lightning wraps each of the ~80 hook calls of a training step in `profiler.profile(name)`,
    a generator-based context manager even when nothing is profiled (~2 us each on a laptop CPU);
    this profiler hands back one shared no-op context instead."""

    def profile(self, action_name: str):
        return _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()


def _experiment_id(uri: str, run_id: str) -> str | None:
    try:
        return tracking.client(uri).get_run(run_id).info.experiment_id
    except Exception:  # the tracking server is unreachable: the run ended anyway
        return None
