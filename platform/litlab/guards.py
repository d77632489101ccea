"""Divergence: a NaN or inf loss stops the run FAILED with a clear reason, or skips the batch.

`NonFiniteGuard` watches the loss each backward pass sees (automatic and manual optimisation).

- Default (`trainer.skip_nonfinite=false`): no host synchronisation and no kernel per step: the
  step keeps a reference to its (detached) loss. Every `check_every` steps the kept losses are
  looked at: on a CPU read one by one (a read there waits for nothing and costs less than a
  kernel); on a GPU folded into one device scalar, `flag += sum(losses) * 0` (0 while every loss
  is finite: 0 * inf and 0 * NaN are NaN, and NaN sticks), two kernels for all of them, read
  through an asynchronous copy looked at a few steps later, so the GPU never waits for the host.
  The flag is also read at epoch ends and, synchronously, before every checkpoint is written: a
  checkpoint is never written after a non-finite loss, so the last one on disk is the last good
  one. The run then raises `TrainingDiverged` (status FAILED, reason tag).
- `trainer.skip_nonfinite=true`: the flag is read before each optimiser step (one sync per step);
  a step whose loss or gradients are not finite is skipped (gradients dropped, so the optimiser's
  state does not move) and counted in `train/skipped_steps`.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.callbacks import Callback

from litlab.errors import TrainingDiverged


def _poisoned(loss: torch.Tensor) -> torch.Tensor:
    """0 (same dtype and device) if every element of `loss` is finite, else NaN."""
    zero = loss.detach() * 0
    zero = zero if zero.ndim == 0 else zero.sum()
    return zero if zero.dtype == torch.float32 else zero.float()


def _poisoned_all(losses: list[torch.Tensor]) -> torch.Tensor:
    """0. (float32 scalar) if every element of every loss is finite, else NaN."""
    if all(loss.ndim == 0 and loss.dtype == torch.float32 for loss in losses):
        return torch.stack(losses).sum() * 0  # (n,) -> scalar
    return sum(_poisoned(loss) for loss in losses)


class NonFiniteGuard(Callback):
    def __init__(self, skip: bool = False, check_every: int = 50):
        self.skip = skip
        self.check_every = check_every
        self._flag: torch.Tensor | None = None  # device scalar: NaN once a non-finite loss was seen since the last check
        self._losses: list[torch.Tensor] = []  # the detached losses since the last fold into _flag
        self._step_flag: torch.Tensor | None = None  # skip mode: this step's losses
        self._in_flight: tuple[torch.Tensor, torch.cuda.Event] | None = None  # async copy of _flag to the host
        self.skipped = 0
        self._batches = 0  # training batches seen: a poll every check_every of them

    @property
    def idle_step_hooks(self) -> tuple[str, ...]:
        """Hooks that return at once in this mode (litlab.fast_loop leaves them out of each step)."""
        return () if self.skip else ("on_before_optimizer_step",)

    # every backward pass -----------------------------------------------------------------------
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not self.skip:
            self._losses.append(loss.detach())
            return
        poisoned = _poisoned(loss)
        self._step_flag = poisoned if self._step_flag is None else self._step_flag + poisoned

    def _fold(self) -> None:
        """Fold the kept losses into the flag (device kernels, no sync). CPU losses are read
        instead: a read there waits for nothing and costs less than the kernels."""
        if not self._losses:
            return
        losses, self._losses = self._losses, []
        if all(loss.is_cpu for loss in losses):
            if not all(math.isfinite(loss.item()) if loss.numel() == 1 else bool(torch.isfinite(loss).all())
                       for loss in losses):
                self._flag = torch.tensor(float("nan"))
            return
        poisoned = _poisoned_all(losses)
        self._flag = poisoned if self._flag is None else self._flag + poisoned

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.skip:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = ~torch.isfinite(self._step_flag) if self._step_flag is not None else torch.zeros((), dtype=torch.bool)
        if grads:
            norms = torch._foreach_norm(grads)
            bad = bad.to(norms[0].device) | ~torch.isfinite(torch.stack(norms)).all()
        self._step_flag = None
        if bool(bad):  # the one sync per step this mode costs
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # torch optimisers leave a parameter without a gradient untouched
            self.skipped += 1
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, reduce_fx="max")

    # the checks ------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._step_flag = None
        self._batches += 1
        if not self.skip and self._batches % self.check_every == 0:
            self._poll(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.skip:
            self._check(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if not self.skip:
            self._check(trainer)  # raising here aborts the save: the last checkpoint stays the good one

    def _poll(self, trainer) -> None:
        """The periodic check: synchronous on the CPU (free there); on a GPU, look at the copy made
        at an earlier poll if it has landed, and start a new one."""
        self._fold()
        if self._flag is None or self._flag.device.type != "cuda":
            self._check(trainer)
            return
        if self._in_flight is not None:
            host, copied = self._in_flight
            if not copied.query():
                return  # not there yet: look again at the next poll
            self._in_flight = None
            if host.item() != 0:  # a host tensor: no device sync
                self._diverged(trainer)
        host = torch.empty((), dtype=self._flag.dtype, pin_memory=True)
        host.copy_(self._flag, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self._in_flight = (host, copied)

    def _check(self, trainer) -> None:
        self._fold()
        self._in_flight = None
        if self._flag is not None and bool(self._flag != 0):
            self._diverged(trainer)

    def _diverged(self, trainer) -> None:
        last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
        where = f"by step {trainer.global_step} (epoch {trainer.current_epoch})"
        raise TrainingDiverged(
            f"the loss became NaN or infinite {where}; the last good checkpoint is kept"
            + (f" ({last})" if last else "")
            + ". Try a lower optim.lr, trainer.gradient_clip_val=1.0, or trainer.skip_nonfinite=true to skip such batches")
