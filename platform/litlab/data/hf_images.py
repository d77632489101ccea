"""Any image-classification data set through Hugging Face `datasets`.

`path` is either a Hub name (`cifar10`, `mnist`; downloaded into the HF cache on first use) or a
local path: a `.parquet` file, a directory holding parquet files (splits inferred from the file
names, e.g. train-*.parquet / test-*.parquet), or an imagefolder directory (`<class>/<img>.png`,
optionally under train/ test/ ...). Splits: `train` (or the only split), val = the first of
validation/valid/val, else `val_fraction` of train; test = `test_split`, else (when the default
"test" is missing) `test_fraction` of train. Carved splits are stratified when the label is a
ClassLabel, and depend on `split_seed` only.

Images become float32 (C, H, W) in [0, 1], then (normalize) standardised per channel with the
TRAIN split's mean/std. Labels become int64 class indices: ClassLabel ids as they are, any other
values (strings, non-contiguous ints) are mapped to 0..K-1 in sorted order (`class_names`).

Memory: when all splits fit in `max_in_memory_mb` as uint8 (MNIST 55 MB, CIFAR-10 184 MB), the
images are decoded ONCE into a uint8 (N, C, H, W) tensor and served by the fast in-memory batch path
(converted to float and normalised per batch). Larger data sets stay lazy: each batch is read and
decoded from the Arrow files by `HFImageBatches.__getitems__` (use num_workers > 0), and the
normalisation stats come from 2000 random train images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from litlab.data.base import LitlabDataModule
from litlab.data.memory import Batch, FastLoaderMixin, TensorBatchDataset
from litlab.data.splits import stratified_split
from litlab.errors import UserError
from litlab.registry import register_data
from litlab.schema import Range

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
_VAL_NAMES = ("validation", "valid", "val")
_STATS_SAMPLE = 2000


class Standardize:
    """Batch transform: uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std, per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (x.float() / 255.0 - self.mean) / self.std


class ToUint8:
    """HF rows {image_column: [PIL], label_column: [...]} -> (uint8 (B, C, H, W), int64 (B,)).

    A plain object (not a bound method of the DataModule) so that loader workers can pickle it."""

    def __init__(self, image_column: str, label_column: str, shape: tuple[int, int, int],
                 resize: bool, label_map: dict | None):
        self.image_column, self.label_column, self.shape = image_column, label_column, shape
        self.resize, self.label_map = resize, label_map

    def __call__(self, rows: dict[str, list]) -> tuple[Tensor, Tensor]:
        from PIL import Image as PILImage

        c, h, w = self.shape
        arrays = []
        for img in rows[self.image_column]:
            img = img.convert("L" if c == 1 else "RGB")
            if img.size != (w, h):
                if not self.resize:
                    raise UserError(f"data.image_size: images have different sizes ({img.width}x{img.height} and "
                                    f"{w}x{h}); set data.image_size to resize them")
                img = img.resize((w, h), PILImage.BILINEAR)
            a = np.asarray(img, dtype=np.uint8)
            arrays.append(a[:, :, None] if a.ndim == 2 else a)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (B, H, W, C) -> (B, C, H, W)
        labels = rows[self.label_column]
        if self.label_map is not None:
            labels = [self.label_map[v] for v in labels]
        return x, torch.as_tensor(labels, dtype=torch.long)


class HFImageBatches(Dataset):
    """Lazy split: `__getitems__` reads a batch of rows from the HF dataset and decodes it."""

    def __init__(self, split, to_uint8: ToUint8, transform: Standardize):
        self.split, self.to_uint8, self.transform = split, to_uint8, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        x, y = self.to_uint8(self.split[list(indices)])
        return Batch((self.transform(x), y))

    def __getitem__(self, index: int):
        x, y = self.__getitems__([index])
        return x[0], y[0]


@register_data("hf_images", description="any image-classification data set: a Hugging Face Hub name (cifar10, "
               "mnist) or a local .parquet file, parquet directory or imagefolder directory")
class HFImagesDataModule(FastLoaderMixin, LitlabDataModule):
    max_in_memory_mb = 200  # decode everything up-front when all splits fit in this (as uint8)

    def __init__(
        self,
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 64,
        num_workers: Annotated[int, Range(ge=0, le=256)] = 0,
        path: str = "",  # Hub name or local path (required)
        image_column: str = "image",  # "img" is accepted when "image" is absent
        label_column: str = "label",
        image_size: Annotated[int, Range(ge=1, le=8192)] | None = None,  # resize to a square (bilinear)
        channels: Literal[1, 3] | None = None,  # None: 1 for grayscale images, else 3
        normalize: bool = True,
        val_fraction: Annotated[float, Range(ge=0.01, le=0.8)] = 0.1,  # if there is no validation split
        test_split: str = "test",
        test_fraction: Annotated[float, Range(ge=0.01, le=0.8)] = 0.1,  # if the default test split is missing
        split_seed: Annotated[int, Range(ge=0, lt=2**32)] = 0,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if not path:
            raise UserError("data.path: is required: a Hugging Face dataset name (e.g. cifar10) or a local path")
        self.path, self.image_column, self.label_column = path, image_column, label_column
        self.image_size, self.channels, self.normalize = image_size, channels, normalize
        self.val_fraction, self.test_split, self.test_fraction = val_fraction, test_split, test_fraction
        self.split_seed = split_seed
        self.raw = None  # datasets.DatasetDict as loaded
        self.hf_splits = None  # {"train", "val", "test"} -> datasets.Dataset, after setup()
        self.class_names: list[str] = []
        self.mean: list[float] = []
        self.std: list[float] = []

    # ------------------------------------------------------------ loading (info() needs it too)
    def _load(self):
        if self.raw is not None:
            return self.raw
        import datasets

        p = Path(self.path).expanduser()
        looks_local = self.path.startswith(("/", ".", "~")) or self.path.endswith(".parquet")
        if not p.exists() and looks_local:
            raise UserError(f"data.path: no such file or directory: {self.path}")
        try:
            if p.is_file():
                if p.suffix != ".parquet":
                    raise UserError(f"data.path: {self.path}: expected a .parquet file or a directory")
                raw = datasets.load_dataset("parquet", data_files={"train": str(p)})
            elif p.is_dir():
                builder = "parquet" if next(p.rglob("*.parquet"), None) else "imagefolder"
                raw = datasets.load_dataset(builder, data_dir=str(p))
            else:
                raw = datasets.load_dataset(self.path)
        except UserError:
            raise
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"data.path: cannot load {self.path!r}: {msg}") from e
        if not isinstance(raw, datasets.DatasetDict) or len(raw) == 0:
            raise UserError(f"data.path: {self.path!r} did not load as a data set with splits")
        self.raw = raw
        self._resolve_columns()
        return raw

    def _train_name(self) -> str:
        if "train" in self.raw:
            return "train"
        if len(self.raw) == 1:
            return next(iter(self.raw))
        raise UserError(f"data.path: {self.path!r} has no 'train' split; splits: {', '.join(self.raw)}")

    def _resolve_columns(self) -> None:
        from datasets import ClassLabel, Image

        train = self.raw[self._train_name()]
        cols = train.column_names
        if self.image_column not in cols and self.image_column == "image" and "img" in cols:
            self.image_column = "img"
        for key, col in (("image_column", self.image_column), ("label_column", self.label_column)):
            if col not in cols:
                raise UserError(f"data.{key}: no column {col!r} in dataset; columns: {', '.join(cols)}")
        feat = train.features[self.image_column]
        if isinstance(feat, dict) and "bytes" in feat:  # image structs from a parquet without HF metadata
            self.raw = self.raw.cast_column(self.image_column, Image())
        elif not isinstance(feat, Image):
            raise UserError(f"data.image_column: column {self.image_column!r} holds {feat}, not images")
        self.raw = self.raw.select_columns([self.image_column, self.label_column])
        train = self.raw[self._train_name()]

        label_feat = train.features[self.label_column]
        if isinstance(label_feat, ClassLabel):
            self.class_names, self._label_map = list(label_feat.names), None
        else:
            values = sorted({v for split in self.raw.values() for v in split.unique(self.label_column)})
            self.class_names = [str(v) for v in values]
            self._label_map = None if values == list(range(len(values))) else {v: i for i, v in enumerate(values)}

        img = train[0][self.image_column]
        c = self.channels or (1 if img.mode in _GRAY_MODES else 3)
        h, w = (self.image_size, self.image_size) if self.image_size else (img.height, img.width)
        self._shape = (c, h, w)
        self._convert = ToUint8(self.image_column, self.label_column, self._shape, bool(self.image_size), self._label_map)

    def info(self) -> dict[str, Any]:
        self._load()
        return {"input_shape": self._shape, "num_classes": len(self.class_names)}

    def prepare_data(self) -> None:
        self._load()  # downloads Hub data sets once (rank 0), before setup() on every rank

    # ------------------------------------------------------------ materialising
    def _materialise(self, split) -> tuple[Tensor, Tensor]:
        parts = [self._convert(rows) for rows in split.iter(batch_size=512)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _stats(self, x_uint8: Tensor) -> tuple[list[float], list[float]]:
        """Per-channel mean/std of uint8 (N, C, H, W) in [0, 1] units, in float64 chunks."""
        c = x_uint8.shape[1]
        s, s2, n = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
        for chunk in x_uint8.split(4096):
            f = chunk.double().div_(255.0).transpose(0, 1).reshape(c, -1)
            s += f.sum(1)
            s2 += (f * f).sum(1)
            n += f.shape[1]
        mean = s / n
        std = (s2 / n - mean**2).clamp_min(1e-12).sqrt()
        return mean.tolist(), std.tolist()

    # ------------------------------------------------------------ splits
    def _carve(self, ds, fraction: float):
        from datasets import ClassLabel

        if isinstance(ds.features[self.label_column], ClassLabel):
            try:  # = ds.train_test_split(..., stratify_by_column=label_column), without its row-by-row label read
                return stratified_split(ds, fraction, self.split_seed, self.label_column)
            except ValueError:  # too few rows per class to stratify
                pass
        parts = ds.train_test_split(test_size=fraction, seed=self.split_seed)
        return parts["train"], parts["test"]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        raw = self._load()
        train = raw[self._train_name()]
        if self.test_split in raw:
            test = raw[self.test_split]
        elif self.test_split != "test":
            raise UserError(f"data.test_split: no split {self.test_split!r}; splits: {', '.join(raw)}")
        else:
            train, test = self._carve(train, self.test_fraction)
        val_name = next((n for n in _VAL_NAMES if n in raw and n != self.test_split), None)
        if val_name:
            val = raw[val_name]
        else:
            train, val = self._carve(train, self.val_fraction)
        self.hf_splits = {"train": train, "val": val, "test": test}

        c, h, w = self._shape
        total_mb = sum(len(s) for s in self.hf_splits.values()) * c * h * w / 2**20
        if total_mb <= self.max_in_memory_mb:
            tensors = {k: self._materialise(s) for k, s in self.hf_splits.items()}
            self.mean, self.std = self._stats(tensors["train"][0]) if self.normalize else ([0.0] * c, [1.0] * c)
            norm = Standardize(self.mean, self.std)
            self.train_set, self.val_set, self.test_set = (
                TensorBatchDataset(*tensors[k], transform=norm) for k in ("train", "val", "test"))
        else:
            if self.normalize:
                g = np.random.default_rng(self.split_seed)
                pick = g.choice(len(train), size=min(_STATS_SAMPLE, len(train)), replace=False)
                self.mean, self.std = self._stats(self._materialise(train.select(np.sort(pick)))[0])
            else:
                self.mean, self.std = [0.0] * c, [1.0] * c
            norm = Standardize(self.mean, self.std)
            self.train_set, self.val_set, self.test_set = (
                HFImageBatches(self.hf_splits[k], self._convert, norm) for k in ("train", "val", "test"))
