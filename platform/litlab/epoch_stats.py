"""A classifier's training-epoch values without a `self.log` per step.

`TrainEpochStats` keeps the running sums of train/loss_epoch and train/acc on the device (a step
pays no host sync and at most two kernels); `EpochValue` shows one of its values to Lightning as a
Metric logged once an epoch (litlab.module.ClassifierModule logs both at on_train_epoch_start).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torchmetrics


class TrainEpochStats(torchmetrics.Metric):
    """The training epoch's running sums on the device, for train/loss_epoch and train/acc.

    `add(loss, logits, target)` is what a training step pays: no kernel on a CPU, two on a GPU (the
    loss added to its running sum, and the argmax: a CUDA-graph output, compile_mode=
    reduce-overhead, is overwritten by the next replay, so the logits themselves are not kept
    there); no host sync, no validation, no self.log. The step's logits (or predictions) and
    targets wait in a short list (references, no copy) and are compared and counted every
    `fold_every` steps, or sooner once they hold `fold_elements` elements (big outputs are not kept
    alive): one cat, argmax, == and sum for the whole group (integer counts: exact in any
    grouping). The loss is summed step by step, in order, in float32, so that a run resumed
    mid-epoch (ExactResume saves these states) adds the same floats in the same order as the
    uninterrupted one; on a CPU (where reading a tensor waits for nothing) the waiting losses are
    read at the fold and added there one by one, with the same rounding for any grouping.
    `epoch_values()` -> (mean loss weighted by batch size, micro accuracy), as Lightning's on_epoch
    mean and MulticlassAccuracy gave them, summed over DDP ranks."""

    full_state_update = False

    def __init__(self, fold_every: int = 256, fold_elements: int = 1 << 22):
        super().__init__()
        self.fold_every, self.fold_elements = fold_every, fold_elements
        self.add_state("loss_sum", torch.zeros(()), dist_reduce_fx="sum")  # sum of loss x batch size
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("samples", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")  # batch sizes
        self.add_state("targets", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")  # labels compared
        # (logits (B, K, ...) or their argmax (B, ...), target (B, ...))
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_elements = 0
        self._pending_losses: list[tuple[torch.Tensor, int]] = []  # CPU: (loss (), batch size)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        """loss (), logits (B, K, ...), target (B, ...) class indices."""
        if loss.is_cpu:
            self._pending_losses.append((loss.detach(), target.shape[0]))
        else:
            self.loss_sum.add_(loss.detach(), alpha=target.shape[0])
        kept = logits.detach() if self.keeps_logits(logits) else logits.detach().argmax(1)
        self._pending.append((kept, target))
        # plain numbers, set past nn.Module.__setattr__'s parameter/buffer/submodule checks
        state = self.__dict__
        state["_pending_elements"] += kept.numel()
        state["_update_count"] += 1
        state["_computed"] = None
        if len(self._pending) >= self.fold_every or state["_pending_elements"] >= self.fold_elements:
            self.fold()

    update = add

    @staticmethod
    def keeps_logits(logits: torch.Tensor) -> bool:
        """Keep the logits themselves until the fold (CPU), or take the argmax at once (GPU)."""
        return not logits.is_cuda

    def fold(self) -> None:
        """Count the waiting comparisons into the states (a few kernels for up to fold_every steps)."""
        if self._pending_losses:
            losses, self._pending_losses = self._pending_losses, []
            values = torch.stack([loss.reshape(()) for loss, _ in losses]).tolist()
            self.loss_sum.fill_(float32_running_sum(self.loss_sum.item(), zip(values, [b for _, b in losses])))
        if not self._pending:
            return
        pending, self._pending, self._pending_elements = self._pending, [], 0
        if len({(kept.dim() - t.dim(), kept.shape[1:], kept.dtype) for kept, t in pending}) == 1:
            kept, targets = torch.cat([k for k, _ in pending]), torch.cat([t for _, t in pending])
            hits = _predictions(kept, targets) == targets  # one cat (and argmax) for the group
        else:  # shapes differ (e.g. sequence lengths): step by step
            hits = torch.cat([(_predictions(kept, t) == t).reshape(-1) for kept, t in pending])
        self.correct += hits.sum()
        self.samples += sum(t.shape[0] for _, t in pending)
        self.targets += sum(t.numel() for _, t in pending)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._values()

    def _values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_sum / self.samples.clamp_min(1), self.correct.float() / self.targets.clamp_min(1)

    def epoch_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.fold()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return self.compute()  # torchmetrics' wrapper: the states summed over the ranks first
        return self._values()  # one process: without the wrapper's sync and cache bookkeeping

    def reset(self) -> None:
        super().reset()
        self._pending, self._pending_elements, self._pending_losses = [], 0, []


def float32_running_sum(start: float, terms: Iterable[tuple[float, int]]) -> float:
    """start + v0 * w0 + v1 * w1 + ..., one term at a time, each partial sum rounded to float32 (the
    product and sum taken in float64 first, as a float32 add_(v, alpha=w) on a CPU computes it): the
    same bits however the terms are split between calls, since a float32 start is kept exactly."""
    total = float(np.float32(start))
    for value, weight in terms:
        total = float(np.float32(total + value * weight))
    return total


def _predictions(kept: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The class indices of what TrainEpochStats kept: logits (B, K, ...) -> argmax over K."""
    return kept if kept.dim() == target.dim() else kept.argmax(1)


class EpochValue(torchmetrics.Metric):
    """One of a TrainEpochStats' epoch values (0: mean loss, 1: accuracy) as a Metric that
    Lightning can log once an epoch: it has no state of its own, counts the stats' updates as its
    own, computes from the stats and resets them (Lightning resets logged metrics at epoch end)."""

    full_state_update = False

    def __init__(self, stats: TrainEpochStats, index: int):
        super().__init__(sync_on_compute=False)  # the stats sum their own states over the ranks
        self._source, self.index = (stats,), index  # a reference, not a submodule

    @property
    def _update_count(self) -> int:
        return self._source[0]._update_count if "_source" in self.__dict__ else 0

    @_update_count.setter
    def _update_count(self, value: int) -> None:
        pass  # counted by the stats

    def update(self, *args, **kwargs) -> None:
        raise RuntimeError("an EpochValue is updated through its TrainEpochStats")

    def compute(self) -> torch.Tensor:
        return self._source[0].epoch_values()[self.index]

    def reset(self) -> None:
        super().reset()
        if self._source[0].update_called:
            self._source[0].reset()


class DeviceMean(torchmetrics.MeanMetric):
    """torchmetrics' MeanMetric without reading the device in update(): MeanMetric checks every
    value for NaN (`if nans.any()`), a host sync per update, so a per-step accuracy or perplexity
    stalls every GPU step. Here the (weighted) sums only grow on the device; a NaN value makes the
    mean NaN instead of being dropped with a warning (a NaN loss is the NonFiniteGuard's to catch).

    update(value (any shape), weight: a number, or a tensor broadcastable to value's shape)."""

    def update(self, value: torch.Tensor | float, weight: torch.Tensor | float = 1.0) -> None:
        value = torch.as_tensor(value, device=self.device).detach().to(self.dtype)
        if isinstance(weight, torch.Tensor):
            weight = torch.broadcast_to(weight.detach().to(self.dtype), value.shape)
            self.mean_value += (value * weight).sum()
            self.weight += weight.sum()
        else:  # sum(value * w) = w * sum(value), without a tensor of weights
            self.mean_value += value.sum() * weight
            self.weight += value.numel() * weight
