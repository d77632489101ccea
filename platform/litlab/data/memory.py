"""Fast in-memory batches for small datasets, on a plain torch DataLoader.

For data this small (digits: 1797 images of 8x8), per-item indexing + `default_collate` costs more
than the model's step. `TensorBatchDataset` holds the whole split as tensors and implements
`__getitems__(indices)`, which torch's DataLoader calls with the *whole batch* of indices when it
has a batch sampler: one tensor gather per batch instead of `batch_size` item look-ups + stack.

The loader from `fast_loader()` is a standard `DataLoader(batch_size=..., shuffle=...)`, so under
DDP Lightning replaces its sampler with a `DistributedSampler(dataset)` and rebuilds the
`BatchSampler` exactly as for any other map-style dataset: each rank gets a disjoint shard, and the
batches still go through `__getitems__` (see tests/test_data.py::test_fast_loader_ddp_sharding).

`__getitems__` returns a `Batch` (a tuple subclass) and `collate_prebatched` passes it through;
any other list of samples (a dataset without `__getitems__`) goes to `default_collate`, so the same
`collate_fn` is safe for every map-style dataset.

The loader is a `litlab.data.resumable.ResumableLoader`: the epoch order, the position in the epoch
and each batch's augmentation are functions of (seed, epoch, batch index), so a run resumed from a
mid-epoch checkpoint sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from litlab.data.resumable import EpochShuffleSampler, ResumableBatchSampler, ResumableLoader


class Batch(tuple):
    """An already collated `(inputs, targets)` batch; `collate_prebatched` passes it through."""


def collate_prebatched(batch):
    if isinstance(batch, Batch):
        return tuple(batch)
    return default_collate(batch)


class TensorBatchDataset(Dataset):
    """`x`: (N, *item_shape), `y`: (N, *target_shape), same N.

    `ds[i]` -> `(x[i], y[i])`; `ds.__getitems__([i, j, ...])` -> `Batch((x[idx], y[idx]))` with a
    leading batch dim. `transform`, if given, maps a batch of inputs (B, *item_shape) to a batch
    (e.g. uint8 -> normalised float, random shifts) and runs per batch, in the loader's worker.
    """

    def __init__(self, x: Tensor, y: Tensor, transform: Callable[[Tensor], Tensor] | None = None):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.x[idx]
        if self.transform is not None:
            seed = getattr(indices, "seed", None)  # set by ResumableBatchSampler: (seed, epoch, batch)
            if seed is None:
                x = self.transform(x)
            else:
                with torch.random.fork_rng(devices=[]):  # the global RNG stream is left untouched
                    torch.manual_seed(seed)
                    x = self.transform(x)
        return Batch((x, self.y[idx]))

    def __getitem__(self, index: int):
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The whole split as one batch (transform applied), e.g. for a full-batch evaluation."""
        return tuple(self.__getitems__(range(len(self))))


def fast_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A resumable DataLoader whose batches come from `dataset.__getitems__` when it has one."""
    sampler = EpochShuffleSampler(len(dataset)) if shuffle else SequentialSampler(dataset)
    return ResumableLoader(
        dataset,
        batch_sampler=ResumableBatchSampler(sampler, batch_size, drop_last),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_prebatched,
    )


class FastLoaderMixin:
    """Put first in the bases of a LitlabDataModule: its loaders use `fast_loader`."""

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() did not create this split")
        return fast_loader(dataset, self.batch_size, shuffle, self.num_workers)
