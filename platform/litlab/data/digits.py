"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), no download.

Built on Hugging Face `datasets`: the raw data is a `datasets.Dataset` (`id`, `image`: uint8 (8, 8)
with values 0..16, `label`: ClassLabel), split train/val/test with a stratified, seeded
`train_test_split` (the split depends on `split_seed` only, never on the run seed; its rows are
computed by `litlab.data.splits`, as HF computes them, without HF's row-by-row label read). `hf_splits` gives
the three HF splits (made on first use). Each split is then materialised once as tensors, pixels /16 -> [0, 1],
optionally resized to `image_size` (bilinear) and standardised with the TRAIN split's mean/std,
and served by the in-memory batch path of `litlab.data.memory`.

Items: `(image float32 (1, image_size, image_size), label int64 ())`.
"""

from __future__ import annotations

import gzip
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from litlab.data.base import LitlabDataModule
from litlab.data.memory import FastLoaderMixin, TensorBatchDataset
from litlab.data.splits import package_file, stratified_split_indices
from litlab.errors import ConfigError
from litlab.registry import register_data
from litlab.schema import Range

Fraction = Annotated[float, Range(ge=0.01, le=0.8)]


class RandomShift:
    """Shift each image of a batch (B, C, H, W) by an independent random (dy, dx) in
    [-max_shift, max_shift]^2, filling the uncovered border with `fill` (the background value)."""

    def __init__(self, max_shift: int = 1, fill: float = 0.0):
        self.max_shift, self.fill = max_shift, fill

    def __call__(self, x: Tensor) -> Tensor:
        s = self.max_shift
        b, c, h, w = x.shape
        padded = F.pad(x, (s, s, s, s), value=self.fill)  # (B, C, H+2s, W+2s)
        oy = torch.randint(0, 2 * s + 1, (b,))  # crop offset into the padding: s means no shift
        ox = torch.randint(0, 2 * s + 1, (b,))
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
        return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


CLASS_NAMES = tuple(str(d) for d in range(10))  # label i is the digit i


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images uint8 (1797, 8, 8) in 0..16, labels int64 (1797,). Read from
    the file scikit-learn ships (sklearn/datasets/data/digits.csv.gz: 64 pixels then the label per
    row) as load_digits reads it, in 25 ms instead of the 0.5 s of importing scikit-learn; through
    load_digits where that file is not found."""
    path = package_file("sklearn", "datasets", "data", "digits.csv.gz")
    if path is not None:
        with gzip.open(path, "rt") as f:
            rows = np.loadtxt(f, delimiter=",")  # (1797, 65)
        return rows[:, :-1].reshape(-1, 8, 8).astype(np.uint8), rows[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    raw = load_digits()
    return raw.images.astype(np.uint8), raw.target


def digits_hf_dataset(arrays: tuple[np.ndarray, np.ndarray] | None = None):
    """The whole data set as a `datasets.Dataset`: id (row in load_digits), image uint8 (8, 8) in
    0..16, label ClassLabel."""
    from datasets import Array2D, ClassLabel, Dataset, Features, Value

    images, labels = digits_arrays() if arrays is None else arrays
    features = Features({
        "id": Value("int32"),
        "image": Array2D((8, 8), "uint8"),
        "label": ClassLabel(names=list(CLASS_NAMES)),
    })
    return Dataset.from_dict({"id": np.arange(len(labels)), "image": images, "label": labels}, features=features)


@register_data("digits", description="scikit-learn's 8x8 handwritten digits (1797 images, 10 classes, no download), "
               "via HF datasets; stratified train/val/test split by split_seed")
class DigitsDataModule(FastLoaderMixin, LitlabDataModule):
    class_names = CLASS_NAMES  # as the HF label feature names them, without building the HF splits

    def __init__(
        self,
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 64,
        num_workers: Annotated[int, Range(ge=0, le=256)] = 0,
        image_size: Annotated[int, Range(ge=4, le=512)] = 8,  # e.g. 32 for LeNet-5 (bilinear, once)
        normalize: bool = True,  # standardise with the train split's mean/std (else pixels in [0, 1])
        augment: bool = False,  # training batches only: random shift by up to 1 pixel
        val_fraction: Fraction = 0.15,
        test_fraction: Fraction = 0.15,
        split_seed: Annotated[int, Range(ge=0, lt=2**32)] = 0,  # independent of the run seed
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if val_fraction + test_fraction > 0.9:
            raise ConfigError("data.val_fraction", f"val_fraction + test_fraction = {val_fraction + test_fraction:g}: "
                              "must be <= 0.9 to leave a training split")
        self.image_size = image_size
        self.normalize = normalize
        self.augment = augment
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None  # (images, labels) after setup()
        self._split_rows: dict[str, np.ndarray] | None = None  # {"train", "val", "test"} -> rows
        self._hf_splits = None
        self.mean, self.std = 0.0, 1.0  # of the train split, in [0, 1] pixel units; set by setup()

    def info(self) -> dict[str, Any]:
        return {"input_shape": (1, self.image_size, self.image_size), "num_classes": 10}

    @property
    def hf_splits(self):
        """datasets.DatasetDict(train, val, test) of the rows setup() chose (None before it), built on
        first use: training reads the same rows from the arrays, and importing `datasets` alone would
        add ~0.7 s to every run's start."""
        if self._hf_splits is None and self._split_rows is not None:
            from datasets import DatasetDict

            ds = digits_hf_dataset(self._arrays)
            self._hf_splits = DatasetDict({name: ds.select(idx) for name, idx in self._split_rows.items()})
        return self._hf_splits

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # all three splits are built at once
            return
        images, labels = self._arrays = digits_arrays()
        # The rows of ds.train_test_split(test_size, seed=split_seed, stratify_by_column="label"), test
        # first, then val out of the rest: computed from the labels at hand (splits.py: 0.9 s less).
        rest, test = stratified_split_indices(labels, self.test_fraction, self.split_seed)
        val_of_rest = self.val_fraction / (1 - self.test_fraction)
        train, val = (rest[i] for i in stratified_split_indices(labels[rest], val_of_rest, self.split_seed))
        rows = self._split_rows = {"train": train, "val": val, "test": test}

        tensors = {}
        for name, idx in rows.items():  # the same rows as each HF split, gathered from the arrays
            x = torch.from_numpy(images[idx]).unsqueeze(1).float() / 16.0  # (N, 1, 8, 8) in [0, 1]
            if self.image_size != 8:
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
            tensors[name] = (x, torch.from_numpy(labels[idx]).long())
        if self.normalize:
            xtr = tensors["train"][0]
            self.mean, self.std = xtr.mean().item(), xtr.std().item()
            tensors = {k: ((x - self.mean) / self.std, y) for k, (x, y) in tensors.items()}

        background = (0.0 - self.mean) / self.std  # value of a blank pixel after normalisation
        shift = RandomShift(1, fill=background) if self.augment else None
        self.train_set = TensorBatchDataset(*tensors["train"], transform=shift)
        self.val_set = TensorBatchDataset(*tensors["val"])
        self.test_set = TensorBatchDataset(*tensors["test"])
