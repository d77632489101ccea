"""A DataLoader whose position survives a checkpoint: exact mid-epoch resume.

Lightning replays the wrong data after a mid-epoch resume with a plain DataLoader (its
RandomSampler draws a fresh permutation from the global RNG, and the epoch restarts from batch 0 of
it). Here every source of data randomness is a pure function of (run seed, epoch, batch index):

- `EpochShuffleSampler`: the permutation of epoch e is randperm(n, generator=seed + e), like
  DistributedSampler (which Lightning puts in its place under DDP, with the same set_epoch
  contract), so a resumed run sees the same order as the uninterrupted one.
- `ResumableBatchSampler`: a BatchSampler that can start `skip` batches into the epoch (index
  lists only, no data is read for skipped batches) and tags each batch of indices with a seed
  derived from (seed, epoch, rank, batch index); `TensorBatchDataset` runs its random transform
  (augmentation) under that seed, so augmentation does not depend on the global RNG, on worker
  processes or on prefetching.
- `ResumableLoader`: a DataLoader with `state_dict()` / `load_state_dict()`, which is Lightning's
  protocol for stateful loaders: the fit loop stores `{"epoch", "consumed"}` in the checkpoint and
  hands it back before the first `iter()` of the resumed run. It draws worker base seeds from its
  own generator, never from the global RNG, so iterating it does not shift the model's random
  stream (dropout) either.

`litlab.resume_state.ExactResume` completes the picture (RNG states, partial epoch aggregates).
"""

from __future__ import annotations

import os
from itertools import islice

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler


def run_seed() -> int:
    """The run's seed as set by seed_everything (the same variable DistributedSampler reads)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def mix(*numbers: int) -> int:
    """A 63-bit seed from several integers (splitmix64 over their sequence): distinct inputs give
    unrelated seeds, unlike seed + epoch which makes (seed, epoch + 1) collide with (seed + 1, epoch)."""
    x = 0x9E3779B97F4A7C15
    for n in numbers:
        x = (x ^ (n & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class EpochShuffleSampler(Sampler[int]):
    """A new permutation of range(n) each epoch, a pure function of (seed, epoch)."""

    def __init__(self, n: int, seed: int | None = None):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        """This epoch's permutation as an int64 tensor (n,)."""
        g = torch.Generator().manual_seed(mix(run_seed() if self.seed is None else self.seed, self.epoch))
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return self.n


class SeededIndices(list):
    """A batch of dataset indices carrying the seed its random transform must use."""

    seed: int = 0


class ResumableBatchSampler(BatchSampler):
    """BatchSampler(sampler, batch_size, drop_last) that starts `skip` batches into the epoch once.

    Same constructor as torch's, so Lightning can rebuild it around a DistributedSampler."""

    def __init__(self, sampler, batch_size: int, drop_last: bool):
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        epoch = getattr(self.sampler, "epoch", 0)
        rank = getattr(self.sampler, "rank", 0)
        seed = run_seed()
        for i, batch in enumerate(islice(super().__iter__(), skip, None), start=skip):
            tagged = SeededIndices(batch)
            tagged.seed = mix(seed, epoch, rank, i)
            yield tagged


class ResumableLoader(DataLoader):
    """A DataLoader Lightning can checkpoint mid-epoch (see the module docstring).

    Build it with `batch_sampler=ResumableBatchSampler(...)`; counts the batches it has handed out
    in the current epoch. (Lightning fetches from sized loaders without prefetching, so handed out
    means trained on, at the moment a step-level checkpoint is written.)"""

    def __init__(self, *args, **kwargs):
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(run_seed())
        super().__init__(*args, **kwargs)
        self._consumed = 0
        self._epoch = 0

    def _sampler_epoch(self) -> int:
        sampler = getattr(self.batch_sampler, "sampler", None)
        return int(getattr(sampler, "epoch", 0))

    def __iter__(self):
        batch_sampler = self.batch_sampler
        self._consumed = getattr(batch_sampler, "skip", 0)
        self._epoch = self._sampler_epoch()
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        epoch, consumed = int(state.get("epoch", 0)), int(state.get("consumed", 0))
        if consumed >= len(self):  # saved at the end of an epoch: the next one starts from its beginning
            epoch, consumed = epoch + 1, 0
        sampler = getattr(self.batch_sampler, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # before Lightning's own set_epoch: workers may start sampling at iter()
        if isinstance(self.batch_sampler, ResumableBatchSampler):
            self.batch_sampler.skip = consumed
