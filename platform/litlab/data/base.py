"""Base DataModule: train/val/test splits, loaders, and `info()` that tells models their shapes.

Subclasses fill `self.train_set`, `self.val_set`, `self.test_set` in `setup()` (map-style datasets
whose items are `(input, target)` tuples) and implement `info()`. The runner calls `info()` before it
builds the model, and fills model arguments of the same name the user left out (`input_shape`,
`num_classes`, ...).
"""

from __future__ import annotations

from typing import Annotated, Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from litlab.schema import Range


class LitlabDataModule(L.LightningDataModule):
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None

    def __init__(
        self,
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 64,
        num_workers: Annotated[int, Range(ge=0, le=256)] = 0,
    ):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers

    def info(self) -> dict[str, Any]:
        """What the model needs to know: e.g. {"input_shape": (1, 8, 8), "num_classes": 10}."""
        raise NotImplementedError

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() did not create this split")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self):
        return self._loader(self.test_set, shuffle=False)
