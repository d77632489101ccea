"""What a checkpoint must hold beyond Lightning's own state for a bit-exact mid-epoch resume.

Lightning checkpoints weights, optimiser, schedulers, grad scaler and loop progress; with
`litlab.data.resumable.ResumableLoader` the data position too. Still missing, and restored here:

- every RNG (python `random`, numpy, torch CPU, CUDA): dropout after the resume draws the numbers
  the uninterrupted run drew. The states are captured when the checkpoint is written (at the end of
  a training batch) and put back just before the next training batch runs, after everything the
  resumed process does while starting (sanity validation, loader set-up) has used the RNGs;
- the running sums behind epoch-level metrics (`self.log(..., on_epoch=True)`) of the unfinished
  epoch: without them `train/loss_epoch` after a resume averages only the batches after it. The
  sums are added back after the first resumed update (a + b == b + a exactly in IEEE arithmetic, so
  the epoch mean is bit-identical to the uninterrupted run's);
- the accumulated states of torchmetrics metrics of the module (e.g. the training accuracy of the
  unfinished epoch), which torchmetrics does not put in the state_dict.
"""

from __future__ import annotations

from typing import Any

import random

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from litlab.data.resumable import ResumableLoader

KEY = "litlab_resume"


def collect_rng_states() -> dict[str, Any]:
    """Every RNG's state in types `torch.load(weights_only=True)` accepts (no numpy arrays)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(_as_tuple(states["python"]))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _tensor_results(trainer) -> dict[str, Any]:
    """The training epoch's accumulated (on_epoch) tensor metrics: key -> (value, cumulated_batch_size)."""
    results = getattr(trainer.fit_loop.epoch_loop, "_results", None) or {}
    out = {}
    for key, entry in results.items():
        if getattr(entry, "is_tensor", False) and entry.meta.on_epoch and not getattr(entry, "has_reset", False):
            out[key] = {"value": entry.value.detach().clone().cpu(),
                        "cumulated_batch_size": getattr(entry, "cumulated_batch_size", None),
                        "reduce": "mean" if entry.meta.is_mean_reduction else
                                  "max" if entry.meta.is_max_reduction else
                                  "min" if entry.meta.is_min_reduction else "sum"}
    return out


def _pending_log(trainer) -> dict[str, Any] | None:
    """What Lightning will log right after this checkpoint is written: the step's (or, at an epoch
    end, the epoch's) metrics and their step; None if it logs nothing then."""
    lc = getattr(trainer, "_logger_connector", None)
    if lc is None or not trainer.loggers or trainer.sanity_checking or not trainer.training:
        return None
    try:
        at_epoch_end = lc._first_loop_iter is None
        if not at_epoch_end and not (lc.should_update_logs or trainer.fast_dev_run):
            return None
        metrics = {k: float(v) for k, v in lc.metrics["log"].items()}
    except Exception:  # Lightning internals moved: resume still works, at worst with this one gap
        return None
    if not metrics:
        return None
    metrics.setdefault("epoch", float(trainer.current_epoch))
    return {"step": int(trainer.fit_loop.epoch_loop._batches_that_stepped), "metrics": metrics}


def _metric_states(module) -> dict[str, dict[str, Any]]:
    import torchmetrics

    out = {}
    for name, m in module.named_modules():
        if isinstance(m, torchmetrics.Metric) and hasattr(m, "fold"):
            m.fold()  # e.g. litlab.module.TrainEpochStats: steps not yet summed into its states
        if isinstance(m, torchmetrics.Metric) and m._update_count:
            out[name] = {"states": {s: _clone(getattr(m, s)) for s in m._defaults}, "update_count": m._update_count}
    return out


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone().cpu()
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


class ExactResume(Callback):
    """Saves and restores RNG states, partial epoch aggregates and metric states (see module doc)."""

    def __init__(self):
        self._pending: dict[str, Any] | None = None
        self._results_to_merge: dict[str, Any] | None = None
        self._mid_epoch = False

    @property
    def idle_step_hooks(self) -> tuple[str, ...]:
        """on_train_batch_start does nothing once no restored state waits for the first batch
        (litlab.fast_loop then leaves it out of each step)."""
        return ("on_train_batch_start",) if self._pending is None else ()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mid_epoch = True  # a checkpoint written now is written between two batches of this epoch
        if self._results_to_merge is not None:
            self._merge_results(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._mid_epoch = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        state: dict[str, Any] = {"rng": collect_rng_states()}
        if self._mid_epoch:
            state["results"] = _tensor_results(trainer)
            state["metrics"] = _metric_states(pl_module)
        pending = _pending_log(trainer)
        if pending:
            state["pending_log"] = pending
        for logger in trainer.loggers:  # step values still being copied to the host: journal them first
            if hasattr(logger, "land_pending"):
                logger.land_pending()
        checkpoint[KEY] = state

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(KEY)
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_states = fit_state.get("combined_loader") or []

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning logs a step's metrics (and an epoch's) just AFTER the checkpoint of that step is
        # written: a kill in between would lose them for good, since the resumed run starts after
        # that step. The checkpoint carries them; send them now (a logger that has them skips them).
        pending = (self._pending or {}).get("pending_log")
        if pending and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(dict(pending["metrics"]), step=pending["step"])
        # Lightning hands the saved loader states back in setup_data(); but a module whose
        # configure_optimizers() reads trainer.estimated_stepping_batches (every cosine/onecycle
        # schedule) makes setup_data() run BEFORE the checkpoint is restored, and the states are
        # never applied. Apply them here: no batch has been drawn yet (the loaders iterate lazily).
        states, self._loader_states = getattr(self, "_loader_states", []), []
        loaders = trainer.train_dataloader
        loaders = loaders if isinstance(loaders, (list, tuple)) else list(loaders.values()) \
            if isinstance(loaders, dict) else [loaders]
        resumable = [dl for dl in loaders if isinstance(dl, ResumableLoader)]
        if states and len(resumable) == len(states):
            for loader, state in zip(resumable, states):
                loader.load_state_dict(state)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        for name, saved in (pending.get("metrics") or {}).items():
            metric = pl_module.get_submodule(name)
            for state_name, value in saved["states"].items():
                setattr(metric, state_name, _to(value, metric.device))
            metric._update_count = saved["update_count"]
            metric._computed = None
        self._results_to_merge = pending.get("results") or None
        if pending.get("rng"):
            set_rng_states(pending["rng"])

    def _merge_results(self, trainer) -> None:
        saved, self._results_to_merge = self._results_to_merge, None
        results = trainer.fit_loop.epoch_loop._results
        for key, s in saved.items():
            entry = results.get(key)
            if entry is None or not entry.is_tensor:
                continue
            value = s["value"].to(entry.value.device)
            if s["reduce"] in ("mean", "sum"):
                entry.value = value + entry.value
                if s["reduce"] == "mean" and s["cumulated_batch_size"] is not None:
                    entry.cumulated_batch_size = s["cumulated_batch_size"].to(entry.value.device) + entry.cumulated_batch_size
            elif s["reduce"] == "max":
                entry.value = torch.maximum(value, entry.value)
            else:
                entry.value = torch.minimum(value, entry.value)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value
