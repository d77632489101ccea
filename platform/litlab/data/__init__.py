"""Shared DataModules; importing this package registers them (see litlab.registry).

digits (sklearn 8x8 digits via HF datasets), hf_images (any HF / local image-classification data
set), function1d and blobs (synthetic). Small splits are served as whole tensors by the fast batch
path of `litlab.data.memory`.
"""

from litlab.data.base import LitlabDataModule
from litlab.data.cifar import CIFAR10DataModule  # noqa: F401 (registers cifar10)
from litlab.data.digits import DigitsDataModule
from litlab.data.hf_images import HFImagesDataModule
from litlab.data.memory import TensorBatchDataset, fast_loader
from litlab.data.shapes import ShapesDataModule  # noqa: F401  (registers "shapes")
from litlab.data.synthetic import BlobsDataModule, Function1DDataModule

__all__ = [
    "LitlabDataModule",
    "DigitsDataModule",
    "HFImagesDataModule",
    "Function1DDataModule",
    "BlobsDataModule",
    "TensorBatchDataset",
    "fast_loader",
]

# Every other module of this package registers its DataModules on import (no list to edit).
import importlib as _importlib  # noqa: E402
import pkgutil as _pkgutil  # noqa: E402

for _module in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _importlib.import_module(f"{__name__}.{_module.name}")
