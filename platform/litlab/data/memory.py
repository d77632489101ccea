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

Speed (the loader is on the critical path of every step of a small model):
- with `num_workers=0` the loader iterates in the process without DataLoader's iterator machinery
  (ResumableLoader); a digits batch costs ~8 us, as `x[perm[i:i+64]]` in a hand-written loop;
- on a GPU, a split that fits `DEVICE_DATA_FRACTION` of the device memory is copied there once
  (`FastLoaderMixin`), and batches are gathered (and augmented) on the device: no host-to-device
  copy per step. A transform that fails on the device keeps its split on the host.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from litlab.data.resumable import EpochShuffleSampler, ResumableBatchSampler, ResumableLoader, mix, run_seed

DEVICE_DATA_FRACTION = 0.25  # at most this share of an accelerator's memory holds one split
EPOCH_GATHER_MAX_BYTES = 256 * 2**20  # up to this size a split is gathered per epoch, not per batch


class Batch(tuple):
    """An already collated `(inputs, targets)` batch; `collate_prebatched` passes it through."""


def collate_prebatched(batch):
    if isinstance(batch, Batch):
        return tuple(batch)
    return default_collate(batch)


def seeded_rng(seed: int, device: torch.device):
    """The global RNG of the CPU (and of `device` if it is a GPU) seeded with `seed` inside the
    block and restored after it: a seeded transform leaves the training's random stream alone."""
    cuda = device.type == "cuda"
    ctx = torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda")

    @contextlib.contextmanager
    def block():
        with ctx:
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.default_generators[device.index or 0].manual_seed(seed)
            yield

    return block()


class TensorBatchDataset(Dataset):
    """`x`: (N, *item_shape), `y`: (N, *target_shape), same N.

    `ds[i]` -> `(x[i], y[i])`; `ds.__getitems__([i, j, ...])` -> `Batch((x[idx], y[idx]))` with a
    leading batch dim. `transform`, if given, maps a batch of inputs (B, *item_shape) to a batch
    (e.g. uint8 -> normalised float, random shifts) and runs per batch, in the loader's worker, on
    the device the tensors are on.
    """

    def __init__(self, x: Tensor, y: Tensor, transform: Callable[[Tensor], Tensor] | None = None):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x, self.y, self.transform = x, y, transform
        self._copies: dict[torch.device, TensorBatchDataset] = {}

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, indices: Sequence[int] | Tensor) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.x.device)
        # seed: set by ResumableBatchSampler / index_batches, a function of (seed, epoch, rank, batch)
        return self.batch(self.x[idx], self.y[idx], getattr(indices, "seed", None))

    def batch(self, x: Tensor, y: Tensor, seed: int | None = None) -> Batch:
        """The batch of the rows x (B, ...), y (B, ...): the transform applied to x, under `seed`."""
        if self.transform is not None:
            if seed is None:
                x = self.transform(x)
            else:
                with seeded_rng(seed, x.device):
                    x = self.transform(x)
        return Batch((x, y))

    def __getitem__(self, index: int):
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The whole split as one batch (transform applied), e.g. for a full-batch evaluation."""
        return tuple(self.__getitems__(range(len(self))))

    @property
    def nbytes(self) -> int:
        return self.x.nbytes + self.y.nbytes

    def __getstate__(self):  # device copies stay in the process that made them
        return {**self.__dict__, "_copies": {}}

    def to(self, device: torch.device) -> TensorBatchDataset:
        """This split with its tensors on `device` (made once, then cached), or itself if it is
        there already or its transform fails on the device (it is tried on two samples)."""
        device = torch.device(device)
        if self.x.device == device:
            return self
        copies = self.__dict__.setdefault("_copies", {})
        if device not in copies:
            copy = TensorBatchDataset(self.x.to(device), self.y.to(device), self.transform)
            try:
                if self.transform is not None:
                    with seeded_rng(0, device):
                        self.transform(copy.x[:2])
            except Exception:  # noqa: BLE001 (e.g. it mixes host and device tensors): stay on the host
                copy = self
            copies[device] = copy
        return copies[device]


def epoch_order(sampler) -> Tensor:
    """The sampler's order for its current epoch as one int64 tensor (what iterating it yields)."""
    if isinstance(sampler, SequentialSampler):
        return torch.arange(len(sampler))
    if type(sampler) is EpochShuffleSampler:
        return sampler.order()
    return torch.as_tensor(list(sampler), dtype=torch.long)  # EpochShuffleSampler, DDP's DistributedSampler


class _EpochPlan:
    """What one pass of a ResumableBatchSampler covers: the epoch's order (n,), the batch size, the
    batches from `skip` to `batches`, and each batch's augmentation seed. Taking the plan consumes
    the sampler's one-shot skip, as iterating it does."""

    def __init__(self, batch_sampler: ResumableBatchSampler):
        self.skip, batch_sampler.skip = batch_sampler.skip, 0
        sampler, self.size = batch_sampler.sampler, batch_sampler.batch_size
        self._key = (run_seed(), getattr(sampler, "epoch", 0), getattr(sampler, "rank", 0))
        self.order = epoch_order(sampler)
        n = len(self.order)
        self.batches = n // self.size if batch_sampler.drop_last else -(-n // self.size)

    def seed(self, i: int) -> int:
        """Batch i's seed: a function of (run seed, epoch, rank, i)."""
        return mix(*self._key, i)


def index_batches(batch_sampler: ResumableBatchSampler, device: torch.device, seeds: bool = True):
    """What `ResumableBatchSampler.__iter__` yields (same batches, same skip, same seeds), as views
    of one tensor of the epoch's order copied to `device` once: no list or host-to-device copy
    per batch. Each index tensor carries its batch's seed as `.seed` (unless `seeds` is False:
    for a dataset without a random transform)."""
    plan = _EpochPlan(batch_sampler)
    order, size = plan.order, plan.size
    if device.type != "cpu":
        order = order.to(device)  # one copy per epoch
    for i in range(plan.skip, plan.batches):
        idx = order[i * size:(i + 1) * size]
        if seeds:
            idx.seed = plan.seed(i)
        yield idx


def gathered_batches(dataset: TensorBatchDataset, batch_sampler: ResumableBatchSampler, seeds: bool = True):
    """The batches of `index_batches` (same rows, order, skip and seeds), from ONE gather of the rest
    of the epoch's rows: each batch is then a slice (a view), not two gathers. On a CPU a tiny
    gather costs as much as a small model's layer (~10 us each), so this halves the loader's share
    of a digits step; the epoch's copy costs what its per-batch gathers would have cost in sum."""
    plan = _EpochPlan(batch_sampler)
    skip, size = plan.skip, plan.size
    if skip >= plan.batches:
        return
    rows = plan.order[skip * size:plan.batches * size].to(dataset.x.device)
    xs, ys = dataset.x[rows], dataset.y[rows]  # (rows, ...): the rest of the epoch, in order
    for i in range(skip, plan.batches):
        lo, hi = (i - skip) * size, (i - skip + 1) * size
        yield dataset.batch(xs[lo:hi], ys[lo:hi], plan.seed(i) if seeds else None)


class FastResumableLoader(ResumableLoader):
    """A ResumableLoader that, without worker processes, iterates in the process itself: index
    tensors from `index_batches`, `dataset.__getitems__`, `collate_fn`, pinning if asked; exactly
    what DataLoader's single-process iterator does for a batched map-style dataset, without its
    per-batch machinery (and without drawing a worker base seed, which nothing uses here)."""

    def __iter__(self):
        fetch = getattr(self.dataset, "__getitems__", None)
        if self.num_workers > 0 or fetch is None or not isinstance(self.batch_sampler, ResumableBatchSampler):
            yield from super().__iter__()
            return
        self._consumed = self.batch_sampler.skip
        self._epoch = self._sampler_epoch()
        tensors = isinstance(self.dataset, TensorBatchDataset)
        device = self.dataset.x.device if tensors else torch.device("cpu")
        pin = self.pin_memory and device.type == "cpu" and torch.cuda.is_available()
        if pin:
            from torch.utils.data._utils.pin_memory import pin_memory
        seeds = not tensors or self.dataset.transform is not None
        plain = tensors and type(self.dataset).__getitems__ is TensorBatchDataset.__getitems__
        if plain and self.dataset.nbytes <= EPOCH_GATHER_MAX_BYTES and not pin:
            state = vars(self)  # _consumed without DataLoader.__setattr__'s checks (a batch counter)
            for batch in gathered_batches(self.dataset, self.batch_sampler, seeds):
                state["_consumed"] += 1
                yield self.collate_fn(batch)
            return
        for idx in index_batches(self.batch_sampler, device, seeds):
            batch = self.collate_fn(fetch(idx))
            if pin:
                batch = pin_memory(batch, self.pin_memory_device or None)
            self._consumed += 1
            yield batch


def fast_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0,
                drop_last: bool = False, device: torch.device | None = None) -> DataLoader:
    """A resumable DataLoader whose batches come from `dataset.__getitems__` when it has one.
    With `device` (and no worker processes), a TensorBatchDataset is first moved there."""
    if device is not None and num_workers == 0 and isinstance(dataset, TensorBatchDataset):
        dataset = dataset.to(device)
    on_host = not isinstance(dataset, TensorBatchDataset) or dataset.x.device.type == "cpu"
    sampler = EpochShuffleSampler(len(dataset)) if shuffle else SequentialSampler(dataset)
    return FastResumableLoader(
        dataset,
        batch_sampler=ResumableBatchSampler(sampler, batch_size, drop_last),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=on_host and torch.cuda.is_available(),
        collate_fn=collate_prebatched,
    )


class FastLoaderMixin:
    """Put first in the bases of a LitlabDataModule: its loaders use `fast_loader`, with the split
    held on the training device when it fits (`data_on_device`, see the module docstring)."""

    data_on_device: bool = True

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() did not create this split")
        return fast_loader(dataset, self.batch_size, shuffle, self.num_workers, device=self._data_device(dataset))

    def _data_device(self, dataset) -> torch.device | None:
        """The trainer's GPU if this split fits DEVICE_DATA_FRACTION of its memory, else None."""
        trainer = getattr(self, "trainer", None)
        if not self.data_on_device or trainer is None or not isinstance(dataset, TensorBatchDataset):
            return None
        device = trainer.strategy.root_device
        if device.type != "cuda":
            return None
        budget = torch.cuda.get_device_properties(device).total_memory * DEVICE_DATA_FRACTION
        return device if dataset.nbytes <= budget else None
