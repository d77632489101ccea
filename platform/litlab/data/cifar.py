"""CIFAR-10 (Krizhevsky 2009): 50000 train + 10000 test 32x32 colour images, 10 classes.

`path` is the Hugging Face Hub name `cifar10` (columns `img`, `label`; downloaded into the HF cache
on first use, 60000 images = 184 MB as uint8, decoded once and held in memory) or a local copy in
any form `hf_images` reads: a .parquet file, a directory of train-*/test-*.parquet files, or an
imagefolder directory. Everything but the CIFAR defaults comes from HFImagesDataModule:
val = `val_fraction` of train (stratified, by `split_seed` only: 45000 / 5000 / 10000), test =
the test split.

normalize: `cifar10` standardises each channel with the CIFAR-10 training-set statistics below
(whatever data `path` holds, so a local copy is normalised exactly like the Hub one); `train` uses
the statistics of this train split; `none` leaves pixels in [0, 1].

augment (training batches only): RandomCrop(32, padding=crop_padding) with black borders +
RandomHorizontalFlip(0.5) when flip, on the uint8 images before normalisation (the standard CIFAR
recipe of He et al. 2015, section 4.2). See litlab.data.augment.

Items: `(image float32 (3, 32, 32), label int64 ())`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from litlab.data.augment import Compose, RandomCrop, RandomHorizontalFlip
from litlab.data.hf_images import HFImagesDataModule, Standardize
from litlab.registry import register_data
from litlab.schema import Range

# Per-channel mean and std of the 50000 CIFAR-10 training images, pixels in [0, 1] (R, G, B).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@register_data("cifar10", description="CIFAR-10 (60000 32x32 colour images, 10 classes) via HF datasets (cifar10) "
               "or a local parquet/imagefolder copy; random crop + flip on train")
class CIFAR10DataModule(HFImagesDataModule):
    def __init__(
        self,
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 128,
        num_workers: Annotated[int, Range(ge=0, le=256)] = 0,
        path: str = "cifar10",  # Hub name or local path
        image_column: str = "img",  # "image" is accepted when "img" is absent
        label_column: str = "label",
        image_size: Annotated[int, Range(ge=1, le=8192)] | None = None,  # None: as stored (32)
        normalize: Literal["cifar10", "train", "none"] = "cifar10",
        augment: bool = True,  # training batches only: random crop (+ flip)
        crop_padding: Annotated[int, Range(ge=0, le=64)] = 4,
        flip: bool = True,
        val_fraction: Annotated[float, Range(ge=0.01, le=0.8)] = 0.1,  # of train, when there is no val split
        test_fraction: Annotated[float, Range(ge=0.01, le=0.8)] = 0.1,  # of train, when there is no test split
        split_seed: Annotated[int, Range(ge=0, lt=2**32)] = 0,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, path=path, image_column=image_column,
                         label_column=label_column, image_size=image_size, channels=3,
                         normalize=normalize == "train", val_fraction=val_fraction, test_split="test",
                         test_fraction=test_fraction, split_seed=split_seed)
        self.normalization = normalize
        self.augment, self.crop_padding, self.flip = augment, crop_padding, flip

    def _resolve_columns(self) -> None:
        cols = self.raw[self._train_name()].column_names
        if self.image_column == "img" and "img" not in cols and "image" in cols:
            self.image_column = "image"
        super()._resolve_columns()

    def train_transforms(self) -> list:
        """The batch augmentations of training batches (uint8 (B, 3, H, W) in and out)."""
        if not self.augment:
            return []
        out = [RandomCrop(None, padding=self.crop_padding, fill=0)] if self.crop_padding else []
        return out + ([RandomHorizontalFlip(0.5)] if self.flip else [])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)  # stats of this train split only when normalize == "train"
        if self.normalization == "cifar10":
            self.mean, self.std = list(CIFAR10_MEAN), list(CIFAR10_STD)
        norm = Standardize(self.mean, self.std)  # (x / 255 - mean) / std; mean 0, std 1 for "none"
        self.train_set.transform = Compose([*self.train_transforms(), norm])
        self.val_set.transform = norm
        self.test_set.transform = norm
