"""When litlab's lean training step (litlab.fast_loop) computes what Lightning's does, and its
per-epoch dispatch tables: the callbacks and module hooks each step calls (only those that
override a hook and do something in it), and the answers that cannot change within an epoch."""

from __future__ import annotations

from typing import Any

import lightning
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.core.module import LightningModule
from lightning.pytorch.core.optimizer import LightningOptimizer, do_nothing_closure
from lightning.pytorch.loops.fetchers import _PrefetchDataFetcher
from lightning.pytorch.loops.loop import _Loop
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities.combined_loader import _MaxSizeCycle
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch.utils._pytree import LeafSpec

CHECKED_VERSIONS = ("2.5.", "2.6.")
STEP_HOOKS = ("on_train_batch_start", "on_before_zero_grad", "on_before_backward", "on_after_backward",
              "on_before_optimizer_step", "on_train_batch_end")
_PRECISION_METHODS = ("convert_input", "pre_backward", "backward", "post_backward", "optimizer_step",
                      "_wrap_closure", "_after_closure", "_clip_gradients")


def supported_version() -> bool:
    return lightning.__version__.startswith(CHECKED_VERSIONS)


def _single_loader_cycle(data_fetcher) -> _MaxSizeCycle | None:
    """The CombinedLoader's iterator if it cycles one loader (a leaf, not a collection of them) of
    known length, the training default; else None."""
    loader = data_fetcher._combined_loader
    cycle = getattr(loader, "_iterator", None)
    if (type(cycle) is _MaxSizeCycle and len(cycle.iterators) == 1 and isinstance(loader._spec, LeafSpec)
            and data_fetcher.length is not None and data_fetcher.iterator is loader):
        return cycle
    return None


def idle_per_step(callback: Callback, hook: str) -> bool:
    """Hooks that do nothing in a training step, left out of it: the on_train_batch_end of a
    ModelCheckpoint saving neither every n training steps nor every time interval (automatic
    optimisation), the on_train_batch_start of a LearningRateMonitor logging once an epoch (it
    only works out whether this is a logging step, then logs nothing), and those a callback names
    in its `idle_step_hooks` (e.g. litlab's NonFiniteGuard, configured not to skip batches)."""
    if hook in getattr(callback, "idle_step_hooks", ()):
        return True
    if hook == "on_train_batch_end" and isinstance(callback, ModelCheckpoint):
        return (type(callback).on_train_batch_end is ModelCheckpoint.on_train_batch_end
                and callback._every_n_train_steps < 1 and callback._train_time_interval is None)
    if hook == "on_train_batch_start" and isinstance(callback, LearningRateMonitor):
        return (type(callback).on_train_batch_start is LearningRateMonitor.on_train_batch_start
                and callback.logging_interval == "epoch")
    return False


class FxNameSetter:
    """The fallback of `fx_names`: item access that goes through the module's own __setattr__."""

    __slots__ = ("module",)

    def __init__(self, module: LightningModule):
        self.module = module

    def __getitem__(self, name: str) -> Any:
        return getattr(self.module, name)

    def __setitem__(self, name: str, value: Any) -> None:
        setattr(self.module, name, value)


def fx_names(module: LightningModule) -> dict | FxNameSetter:
    """Where `module._current_fx_name = hook` lands (set and reset around each of ~20 calls a
    step): the instance dict itself when the module's __setattr__ is nn.Module's (a str attribute
    goes there) or says it is equivalent for that name (`plain_fx_name`), without a call of it."""
    setter = type(module).__setattr__
    if setter is torch.nn.Module.__setattr__ or getattr(setter, "plain_fx_name", False):
        return vars(module)
    return FxNameSetter(module)


def _overrides(obj: Any, base: type, name: str) -> bool:
    return getattr(type(obj), name, None) is not getattr(base, name, None) or name in vars(obj)


def _with_step_hooks(lightning_optimizer: LightningOptimizer) -> LightningOptimizer | None:
    """The LightningOptimizer if its _on_before_step/_on_after_step do something (manual
    optimisation sets them; automatic leaves Lightning's do-nothing closure), else None."""
    hooks = (lightning_optimizer._on_before_step, lightning_optimizer._on_after_step)
    return None if all(h is do_nothing_closure for h in hooks) else lightning_optimizer


def lean_plan(loop: _TrainingEpochLoop, data_fetcher) -> dict | None:
    """The per-epoch dispatch tables of `loop`'s lean step (litlab.fast_loop), or None when the
    lean path would not compute what Lightning's advance() computes."""
    trainer = loop.trainer
    module = trainer.lightning_module
    precision = trainer.precision_plugin
    plain_precision = all(getattr(type(precision), m) is getattr(Precision, m) for m in _PRECISION_METHODS
                          if m not in ("convert_input",)) or (
        type(precision) is MixedPrecision and precision.scaler is None)
    if not (
        supported_version()
        and type(data_fetcher) is _PrefetchDataFetcher
        and module.automatic_optimization
        and len(trainer.optimizers) == 1
        and trainer.accumulate_grad_batches == 1
        and type(trainer.strategy) is SingleDeviceStrategy
        and plain_precision
        and not _overrides(module, LightningModule, "optimizer_step")
        and not any(_overrides(trainer.strategy, Strategy, h)
                    for h in ("on_train_batch_start", "pre_backward", "post_backward", "batch_to_device"))
    ):
        return None
    transfer_hooks = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
    datamodule = getattr(trainer, "datamodule", None)
    plain_transfer = (
        getattr(type(precision), "convert_input") is Precision.convert_input
        and not any(_overrides(module, LightningModule, h) for h in transfer_hooks)
        and (datamodule is None or not any(_overrides(datamodule, LightningDataModule, h) for h in transfer_hooks)))
    return {
        "lm": module,  # trainer.lightning_module: a property chain, otherwise looked up ~10 times a step
        "fx": fx_names(module),
        "val_subloops": any(isinstance(v, _Loop) for v in vars(loop.val_loop).values()),
        "val_epoch": _TrainingEpochLoop._should_check_val_epoch(loop),
        # validation every n batches of the epoch (Lightning's batch-based check), else None
        "val_every_batch": (trainer.val_check_batch if trainer.check_val_every_n_epoch is not None
                            and getattr(trainer, "_val_check_time_interval", None) is None
                            and type(trainer.val_check_batch) is int else None),
        # what cannot change while the epoch's batches run: looked up through property chains otherwise
        "strategy": trainer.strategy,
        "optimizer": trainer.optimizers[0],
        "lightning_optimizer": _with_step_hooks(trainer.strategy._lightning_optimizers[0]),
        "post_training_step": (trainer.strategy.post_training_step  # deprecated, a no-op unless overridden
                               if _overrides(trainer.strategy, Strategy, "post_training_step") else None),
        "epoch": trainer.current_epoch,  # counted once the epoch is done
        "num_batches": trainer.num_training_batches,  # set for the epoch before it runs (fit_loop.setup_data)
        "plateau": any(config.reduce_on_plateau for config in trainer.lr_scheduler_configs),
        "schedulers": {interval: [c for c in trainer.lr_scheduler_configs
                                  if not c.reduce_on_plateau and c.interval == interval]
                       for interval in ("step", "epoch")},
        "cycle": _single_loader_cycle(data_fetcher),
        "device": trainer.strategy.root_device if plain_transfer else None,
        "callbacks": {h: [getattr(cb, h) for cb in trainer.callbacks
                          if _overrides(cb, Callback, h) and not idle_per_step(cb, h)]
                      for h in STEP_HOOKS},
        "module": {h: getattr(module, h) for h in (*STEP_HOOKS, "backward", "optimizer_zero_grad", "lr_scheduler_step",
                                                   "configure_gradient_clipping")
                   if _overrides(module, LightningModule, h) or h in ("backward", "optimizer_zero_grad",
                                                                      "configure_gradient_clipping")},
        "batch_idx_arg": is_param_in_hook_signature(module.training_step, "batch_idx", min_args=2),
        # full precision, an uncompiled module, Lightning's own training_step: the strategy's
        # forward context is a no-op and it calls module.training_step itself
        "direct_step": (type(precision) is Precision and trainer.strategy.model is module
                        and type(trainer.strategy).training_step is Strategy.training_step),
    }
