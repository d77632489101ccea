"""Divergence: a NaN or inf loss stops the run FAILED with a clear reason, or skips the batch.

`NonFiniteGuard` watches the loss each backward pass sees (automatic and manual optimisation).

- Default (`trainer.skip_nonfinite=false`): no host synchronisation per step. Non-finiteness is
  accumulated on the device and read every `check_every` steps, at epoch ends and before every
  checkpoint is written; a checkpoint is never written after a non-finite loss, so the last one on
  disk is the last good one. The run then raises `TrainingDiverged` (status FAILED, reason tag).
- `trainer.skip_nonfinite=true`: the flag is read before each optimiser step (one sync per step);
  a step whose loss or gradients are not finite is skipped (gradients dropped, so the optimiser's
  state does not move) and counted in `train/skipped_steps`.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from litlab.errors import TrainingDiverged


class NonFiniteGuard(Callback):
    def __init__(self, skip: bool = False, check_every: int = 50):
        self.skip = skip
        self.check_every = check_every
        self._bad: torch.Tensor | None = None  # device bool: a non-finite loss since the last check
        self._step_bad: torch.Tensor | None = None
        self.skipped = 0
        self._first_bad_step: int | None = None

    # every backward pass -----------------------------------------------------------------------
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad = bad if self._bad is None else self._bad | bad
        self._step_bad = bad if self._step_bad is None else self._step_bad | bad

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.skip:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = self._step_bad if self._step_bad is not None else torch.zeros((), dtype=torch.bool)
        if grads:
            norms = torch._foreach_norm(grads)
            bad = bad.to(norms[0].device) | ~torch.isfinite(torch.stack(norms)).all()
        self._step_bad = None
        if bool(bad):  # the one sync per step this mode costs
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # torch optimisers leave a parameter without a gradient untouched
            self.skipped += 1
            self._bad = None
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, reduce_fx="max")

    # the checks ------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._step_bad = None
        if not self.skip and (trainer.global_step % self.check_every == 0):
            self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.skip:
            self._check(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if not self.skip:
            self._check(trainer)  # raising here aborts the save: the last checkpoint stays the good one

    def _check(self, trainer) -> None:
        if self._bad is not None and bool(self._bad):
            last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
            where = f"by step {trainer.global_step} (epoch {trainer.current_epoch})"
            raise TrainingDiverged(
                f"the loss became NaN or infinite {where}; the last good checkpoint is kept"
                + (f" ({last})" if last else "")
                + ". Try a lower optim.lr, trainer.gradient_clip_val=1.0, or trainer.skip_nonfinite=true to skip such batches")
