"""A lean training step: Lightning's training-batch loop without its per-step dispatch machinery.

Lightning runs one training batch through ~40 hook dispatches (each wraps the call in a profiler
context, formats names, walks every callback whether it overrides the hook or not), a closure
object, the LightningOptimizer -> strategy -> precision -> torch optimizer chain and an
`inspect.signature` of `training_step`. For a small model on a CPU that costs more than the step
itself (a digits MLP: ~0.5 ms of machinery around ~0.35 ms of work). `LeanTrainingEpochLoop`
replaces `Trainer.fit_loop.epoch_loop` (runner: `trainer.fast_loop=true`, the default) and runs
the same batch in the same order of hooks, with the same arguments and the same
`_current_fx_name` seen by each, the same progress counters and the same results:

    fetch -> convert_input -> on_before_batch_transfer -> batch_to_device -> on_train_batch_start
    -> training_step -> on_before_zero_grad -> optimizer_zero_grad -> on_before_backward -> backward
    -> on_after_backward -> on_before_optimizer_step -> configure_gradient_clipping -> optimizer.step
    -> lr_scheduler_step -> on_train_batch_end -> logger connector (log every n steps)

but calls only the callbacks that override each hook, directly (leaving out the hooks that would
return at once), updates the logger connector's dicts only when a value was logged on_step (else
they would be updated with nothing), answers once an epoch what Lightning asks after every
batch and cannot change within an epoch (validate this epoch, every how many batches? is there a
plateau scheduler?), and after a batch that needs nothing more only counts it (on_advance_end).
It takes this path (litlab.lean_plan) only where it is the same computation: automatic optimisation with one
optimiser, no gradient accumulation, one device (SingleDeviceStrategy), a precision plugin whose
backward/step are Lightning's plain ones (32, 64, bf16-mixed, 16-true; not 16-mixed with its grad
scaler), a module that does not override optimizer_step, no dataloader_iter training_step, not
the first batch after a restart, and a Lightning version this was checked against (2.5, 2.6).
Anything else runs Lightning's own `advance()`, unchanged. tests/test_performance.py trains the
same run both ways and compares the weights, optimiser state and every logged metric bit for bit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.loops.optimization.automatic import ClosureResult
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

from litlab.lean_plan import lean_plan, supported_version
from litlab.lightning_speedups import (defer_progress_bar_reads, log_numbers_without_copies, log_step_values_without_reads,
                                      skip_needless_moves)

FX = "_current_fx_name"  # the hook running now, as LightningModule.log reads it


def install(trainer) -> bool:
    """Put a LeanTrainingEpochLoop in the trainer (before fit); False if this Lightning is unknown."""
    if not supported_version():
        return False
    skip_needless_moves()
    log_numbers_without_copies()
    defer_progress_bar_reads(trainer)
    log_step_values_without_reads(trainer)
    old = trainer.fit_loop.epoch_loop
    trainer.fit_loop.epoch_loop = LeanTrainingEpochLoop(trainer, min_steps=old.min_steps, max_steps=old.max_steps)
    return True


def _nothing() -> None:
    pass


def _on_device(batch: Any, device: torch.device | None) -> bool:
    """A tuple/list of plain tensors all on `device` (None: never)."""
    return device is not None and type(batch) in (tuple, list) and all(
        type(t) is torch.Tensor and t.device == device for t in batch)


class _StepResult:
    """ClosureResult.from_training_step_output without accumulation (normalize 1) and without a
    grad scaler (nothing scales the loss in place): no `loss / 1` and no clone, two kernels less a
    step; `loss` (what on_train_batch_end gets as outputs["loss"]) is the detached loss itself."""

    __slots__ = ("closure_loss", "loss", "extra")

    def __init__(self, closure_loss: torch.Tensor | None, extra: dict):
        self.closure_loss, self.extra = closure_loss, extra
        self.loss = closure_loss.detach() if closure_loss is not None else None

    @classmethod
    def of(cls, output: Any) -> "_StepResult":
        if isinstance(output, torch.Tensor) or output is None:
            return cls(output, {})
        if isinstance(output, Mapping) and output.get("loss") is not None:
            return cls(output["loss"], {k: v for k, v in output.items() if k != "loss"})
        ClosureResult.from_training_step_output(output)  # raises Lightning's own error for this output
        raise AssertionError("unreachable")

    def asdict(self) -> dict:
        return {"loss": self.loss, **self.extra}


class LeanTrainingEpochLoop(_TrainingEpochLoop):
    def on_run_start(self, data_fetcher) -> None:
        super().on_run_start(data_fetcher)
        self._plan = lean_plan(self, data_fetcher)
        if self._plan is not None and type(self.trainer.profiler) is PassThroughProfiler:
            # each fetch would format two action names for a profiler that records nothing
            data_fetcher._start_profiler = data_fetcher._stop_profiler = _nothing
        self.lean_epoch = self._plan is not None  # this epoch's batches take the lean path (kept after it)

    # ---------------------------------------------------------------- dispatch
    def _callbacks(self, hook: str, *args) -> None:
        fns = self._plan["callbacks"][hook]
        if not fns:
            return
        trainer = self.trainer
        module, fx = self._plan["lm"], self._plan["fx"]
        prev, fx[FX] = fx[FX], hook
        for fn in fns:
            fn(trainer, module, *args)
        fx[FX] = prev

    def _module(self, hook: str, *args, **kwargs):
        fn = self._plan["module"].get(hook)
        if fn is None:
            return None
        fx = self._plan["fx"]
        prev, fx[FX] = fx[FX], hook
        out = fn(*args, **kwargs)
        fx[FX] = prev
        return out

    # ---------------------------------------------------------------- one batch
    def advance(self, data_fetcher) -> None:
        plan = getattr(self, "_plan", None)
        if plan is None or self._restarting:
            return super().advance(data_fetcher)
        if plan["val_subloops"] or self.val_loop._restarting:
            self.val_loop.restarting = False  # the setter walks every attribute for sub-loops
        trainer = self.trainer
        batch = self._fetch(data_fetcher)
        batch_idx = self.batch_idx + 1
        self.batch_progress.is_last_batch = data_fetcher.done
        module = plan["lm"]
        if not _on_device(batch, plan["device"]):  # else every transfer step would return the batch as it is
            batch = trainer.precision_plugin.convert_input(batch)
            batch = module._on_before_batch_transfer(batch, dataloader_idx=0)
            fx = plan["fx"]
            prev, fx[FX] = fx[FX], "batch_to_device"
            batch = plan["strategy"].batch_to_device(batch, dataloader_idx=0)
            fx[FX] = prev
        self.batch_progress.increment_ready()
        self._connector_batch_start(batch)

        batch_output = None
        skip_rest_of_epoch = False
        if batch is None:
            self._warning_cache.warn("train_dataloader yielded None. If this was on purpose, ignore this warning...")
        else:
            self._callbacks("on_train_batch_start", batch, batch_idx)
            response = self._module("on_train_batch_start", batch, batch_idx)
            skip_rest_of_epoch = response == -1
            if skip_rest_of_epoch:
                self.batch_progress.increment_by(0, is_last_batch=True)
            else:
                self.batch_progress.increment_started()
                kwargs = OrderedDict(batch=batch)
                if plan["batch_idx_arg"]:
                    kwargs["batch_idx"] = batch_idx
                batch_output = self._optimize(plan["optimizer"], batch_idx, kwargs)

        self.batch_progress.increment_processed()
        self._step_schedulers("step")
        if self._ready_batches_reached(plan):
            self._step_schedulers("epoch")
        if skip_rest_of_epoch:
            raise StopIteration

        self._callbacks("on_train_batch_end", batch_output, batch, batch_idx)
        self._module("on_train_batch_end", batch_output, batch, batch_idx)
        step_values = self._connector_batch_end()
        self.batch_progress.increment_completed()
        if step_values:  # else Lightning's update_train_step_metrics would log an empty dict: nothing
            trainer._logger_connector.update_train_step_metrics()

    def _fetch(self, data_fetcher) -> Any:
        """next(data_fetcher)'s batch. For one loader of known length (nothing prefetched) the
        fetcher's, CombinedLoader's and _MaxSizeCycle's __next__ unrolled: the same batch, counters
        (fetched, _idx) and done flag, without three frames and a pytree unflatten of one leaf."""
        cycle = self._plan["cycle"]
        if cycle is None or data_fetcher.batches:
            return next(data_fetcher)[0]
        if data_fetcher.done:
            raise StopIteration
        data_fetcher._start_profiler()
        try:
            batch = next(cycle.iterators[0])
        except StopIteration:
            cycle._consumed[0] = True  # the only loader: the epoch's end
            data_fetcher.done = True
            raise
        finally:
            data_fetcher._stop_profiler()
        cycle._idx += 1
        data_fetcher.fetched += 1
        data_fetcher.done = data_fetcher.fetched >= data_fetcher.length
        return batch

    # ---------------------------------------------------------------- the logger connector's step
    def _connector_batch_start(self, batch: Any) -> None:
        """_LoggerConnector.on_batch_start(batch) with this loop's result collection (what
        trainer._results resolves to while training) instead of three property lookups."""
        connector = self.trainer._logger_connector
        if connector._first_loop_iter is None:
            connector._first_loop_iter = True
        elif connector._first_loop_iter is True:
            connector._first_loop_iter = False
        results = self._results
        results.batch, results.batch_size, results.dataloader_idx = batch, None, None

    def _connector_batch_end(self) -> bool:
        """_LoggerConnector.on_batch_end(); True if a value was logged on_step. Without one (all
        of litlab's step values go to the tracker directly) results.metrics(on_step=True) is
        empty and the three metric dicts would be updated with nothing: only the batch is let go."""
        results = self._results
        if any(item.meta.on_step for item in results.values()):
            self.trainer._logger_connector.on_batch_end()
            return True
        results.batch = results.batch_size = None
        return False

    # ---------------------------------------------------------------- per epoch, not per step
    def _should_check_val_epoch(self) -> bool:
        """Lightning asks this after every batch (trainer.enable_validation walks the module's
        overrides each time); it cannot change within an epoch: the value at the epoch's start
        (the plan lives only while the epoch runs)."""
        plan = getattr(self, "_plan", None)
        if plan is not None:
            return plan["val_epoch"]
        return super()._should_check_val_epoch()

    def _ready_batches_reached(self, plan: dict) -> bool:
        """_num_ready_batches_reached() with the epoch's batch count from the plan."""
        progress = self.batch_progress
        return progress.is_last_batch or progress.current.ready == plan["num_batches"]

    @property
    def done(self) -> bool:
        """Lightning's `done`, asked before every batch: while the lean plan runs and nothing asks
        to stop or restart (validation is then done), whether training is: the epoch's last batch
        is ready or max_steps (optimizer steps: automatic optimisation) reached."""
        plan = getattr(self, "_plan", None)
        if plan is None or self._restarting or self.trainer.should_stop:
            return _TrainingEpochLoop.done.fget(self)
        if self._ready_batches_reached(plan):
            return True
        max_steps = self.max_steps
        return max_steps != -1 and self.automatic_optimization.optim_progress.optimizer_steps >= max_steps

    def on_advance_end(self, data_fetcher) -> None:
        plan = getattr(self, "_plan", None)
        if plan is not None and self._only_counts_the_batch(plan):
            self._batches_that_stepped += 1  # all Lightning's on_advance_end would do after this batch
            return
        super().on_advance_end(data_fetcher)

    def _only_counts_the_batch(self, plan: dict) -> bool:
        """After a batch that is not the epoch's last: no validation now (not this epoch, or not
        this batch of a batch-based check), no plateau scheduler, no stop or SIGTERM asked, no
        skipped validation to clear; then on_advance_end only counts the stepped batch (the lean
        plan has no gradient accumulation)."""
        trainer = self.trainer
        if (self._skip_next_val or plan["plateau"] or trainer.should_stop or self.batch_progress.is_last_batch
                or trainer.received_sigterm):
            return False
        if not plan["val_epoch"]:
            return True
        every = plan["val_every_batch"]
        return every is not None and (self.batch_idx + 1) % every != 0

    def update_lr_schedulers(self, interval: str, update_plateau_schedulers: bool) -> None:
        plan = getattr(self, "_plan", None)
        if plan is not None and update_plateau_schedulers and not plan["plateau"]:
            return  # Lightning would walk the schedulers and step none: there is no ReduceLROnPlateau
        super().update_lr_schedulers(interval, update_plateau_schedulers)

    def run(self, data_fetcher) -> None:
        try:
            super().run(data_fetcher)
        finally:
            self._plan = None  # the per-epoch answers above end with the epoch

    def _step_schedulers(self, interval: str) -> None:
        """update_lr_schedulers(interval, update_plateau_schedulers=False) without accumulation:
        each non-plateau scheduler of this interval whose frequency divides the batch (or epoch)
        number steps, through the module's lr_scheduler_step if it has one."""
        configs = self._plan["schedulers"][interval]
        if not configs:
            return
        current = (self.batch_idx if interval == "step" else self._plan["epoch"]) + 1
        hook = self._plan["module"].get("lr_scheduler_step")  # only if the module overrides it
        for config in configs:
            if current % config.frequency:
                continue
            self.scheduler_progress.increment_ready()
            if hook is None:
                config.scheduler.step()
            else:
                self._module("lr_scheduler_step", config.scheduler, None)
            self.scheduler_progress.increment_completed()

    def _optimize(self, optimizer: torch.optim.Optimizer, batch_idx: int, kwargs: OrderedDict) -> dict:
        """_AutomaticOptimization.run for one optimiser without accumulation, unrolled."""
        trainer = self.trainer
        progress = self.automatic_optimization.optim_progress.optimizer
        lightning_optimizer = self._plan["lightning_optimizer"]  # its step hooks: None when they do nothing
        progress.step.increment_ready()
        if lightning_optimizer is not None:
            lightning_optimizer._on_before_step()
        with torch.enable_grad():  # as torch's optimizer.step(closure) runs the closure
            result = self._closure(optimizer, batch_idx, kwargs)
        # Precision._after_closure: the hooks, then gradient clipping (the module's hook)
        self._callbacks("on_before_optimizer_step", optimizer)
        self._module("on_before_optimizer_step", optimizer)
        self._module("configure_gradient_clipping", optimizer, gradient_clip_val=trainer.gradient_clip_val,
                     gradient_clip_algorithm=trainer.gradient_clip_algorithm)
        optimizer.step()
        if lightning_optimizer is not None:
            lightning_optimizer._on_after_step()
        progress.step.increment_completed()
        if result.loss is None:
            return {}
        return result.asdict()

    def _closure(self, optimizer, batch_idx: int, kwargs: OrderedDict) -> _StepResult:
        """training_step, zero_grad, backward: what Lightning's Closure runs inside optimizer.step."""
        plan = self._plan
        module, fx = plan["lm"], plan["fx"]
        prev, fx[FX] = fx[FX], "training_step"
        if plan["direct_step"]:  # Strategy.training_step with nothing around the module's
            output = module.training_step(*kwargs.values())
        else:
            output = plan["strategy"].training_step(*kwargs.values())
        fx[FX] = prev
        if plan["post_training_step"] is not None:
            plan["post_training_step"]()
        result = _StepResult.of(output)
        if result.closure_loss is None:
            self._warning_cache.warn("`training_step` returned `None`. If this was on purpose, ignore this warning...")
        automatic = self.automatic_optimization
        if automatic._skip_backward:
            return result
        zero_grad = automatic.optim_progress.optimizer.zero_grad
        zero_grad.increment_ready()
        self._callbacks("on_before_zero_grad", optimizer)
        self._module("on_before_zero_grad", optimizer)
        zero_grad.increment_started()
        self._module("optimizer_zero_grad", plan["epoch"], batch_idx, optimizer)
        zero_grad.increment_completed()
        if result.closure_loss is not None:
            self._backward(result.closure_loss)
        return result

    def _backward(self, loss: torch.Tensor) -> None:
        """Strategy.backward -> Precision.pre_backward / backward / post_backward, unrolled."""
        module, fx = self._plan["lm"], self._plan["fx"]
        prev, fx[FX] = fx[FX], "backward"
        self._callbacks("on_before_backward", loss)
        self._module("on_before_backward", loss)
        fx[FX] = "backward"
        module.backward(loss)
        self._callbacks("on_after_backward")
        self._module("on_after_backward")
        fx[FX] = prev
