"""Image-to-image tasks generated from scikit-learn's digits (no download), pixels in [0, 1].

`digit_pairs` (PAIRED, for pix2pix): items (input (1, S, S), target (1, S, S), label ()):
    outline   digit -> its outline, the morphological gradient dilate(x) - erode(x) (3x3)
    superres  low resolution (S/4 x S/4 area means, shown blocky at S x S) -> the sharp digit
    inpaint   the digit with its bottom half hidden (set to 0.5 grey) -> the whole digit
`digit_domains` (UNPAIRED, for CycleGAN): domain A = digits, domain B = T(digits) with
    thicken   T = grey dilation, a 3x3 max filter (strokes one pixel thicker at S = 16)
    invert    T(x) = 1 - x
  Training items (a, b): a from one half of the training digits, b = T(d) for d from the OTHER half,
  b drawn at random for every batch, so no batch ever pairs an image with its own transform.
  Validation/test items (x, T(x)) are true pairs: the model trains without them but is scored on
  how close G_AB(x) is to T(x), which only a generated task can tell.

Both start from DigitsDataModule(normalize=False, image_size=S) splits (same split_seed -> same
images), so S > 8 is a bilinear upsampling of the 8x8 originals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from litlab.data.base import LitlabDataModule
from litlab.data.digits import DigitsDataModule
from litlab.data.memory import Batch, FastLoaderMixin
from litlab.errors import ConfigError
from litlab.registry import register_data
from litlab.schema import Range

Fraction = Annotated[float, Range(ge=0.01, le=0.8)]
ImageSize = Annotated[int, Range(ge=8, le=128)]
PairedTask = Literal["outline", "superres", "inpaint"]
DomainTask = Literal["thicken", "invert"]


# ---------------------------------------------------------------- transforms of (N, 1, S, S) in [0, 1]
def dilate(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)  # grey dilation: max over the 3x3 neighbourhood


def erode(x: Tensor) -> Tensor:
    return -F.max_pool2d(-x, 3, stride=1, padding=1)


def outline(x: Tensor) -> Tensor:
    return (dilate(x) - erode(x)).clamp(0, 1)


def low_resolution(x: Tensor, factor: int = 4) -> Tensor:
    small = F.avg_pool2d(x, factor)  # (N, 1, S/f, S/f)
    return F.interpolate(small, scale_factor=factor, mode="nearest")


def hide_bottom(x: Tensor, fill: float = 0.5) -> Tensor:
    out = x.clone()
    out[..., x.shape[-2] // 2:, :] = fill
    return out


def invert(x: Tensor) -> Tensor:
    return 1 - x


PAIRED = {"outline": outline, "superres": low_resolution, "inpaint": hide_bottom}
DOMAINS = {"thicken": dilate, "invert": invert}


# ---------------------------------------------------------------- datasets (whole batches at once)
class PairedTensors(Dataset):
    """(input, target, label) tensors of the same length; batches via __getitems__."""

    def __init__(self, inputs: Tensor, targets: Tensor, labels: Tensor):
        self.inputs, self.targets, self.labels = inputs, targets, labels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Batch((self.inputs[idx], self.targets[idx], self.labels[idx]))

    def __getitem__(self, i: int):
        return tuple(t[0] for t in self.__getitems__([i]))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.inputs, self.targets, self.labels


class UnpairedTensors(Dataset):
    """Items (a_i, b_j) with j drawn uniformly at random for every request: A and B unaligned."""

    def __init__(self, a: Tensor, b: Tensor):
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        j = torch.randint(len(self.b), (len(idx),))
        return Batch((self.a[idx], self.b[j]))

    def __getitem__(self, i: int):
        a, b = self.__getitems__([i])
        return a[0], b[0]


class UnpairedPairs(Dataset):
    """Evaluation items (x, T(x)): aligned, for scoring G_AB(x) against the truth T(x)."""

    def __init__(self, a: Tensor, b: Tensor):
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Batch((self.a[idx], self.b[idx]))

    def __getitem__(self, i: int):
        a, b = self.__getitems__([i])
        return a[0], b[0]


class _DigitTaskModule(FastLoaderMixin, LitlabDataModule):
    def __init__(self, batch_size: int, num_workers: int, image_size: int, val_fraction: float,
                 test_fraction: float, split_seed: int):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.image_size = image_size
        self._digits = DigitsDataModule(image_size=image_size, normalize=False, val_fraction=val_fraction,
                                        test_fraction=test_fraction, split_seed=split_seed)
        self.normalize = False  # pixels in [0, 1], as the GAN modules require

    def _splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        self._digits.setup()
        d = self._digits
        return {"train": d.train_set.tensors(), "val": d.val_set.tensors(), "test": d.test_set.tensors()}


@register_data("digit_pairs", description="paired digit image-to-image tasks for pix2pix: digit -> outline, "
               "low-res -> sharp, half-hidden -> whole (items input, target, label)")
class DigitPairsDataModule(_DigitTaskModule):
    def __init__(
        self,
        task: PairedTask = "inpaint",
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 32,
        num_workers: Annotated[int, Range(ge=0, le=256)] = 0,
        image_size: ImageSize = 16,
        val_fraction: Fraction = 0.15,
        test_fraction: Fraction = 0.15,
        split_seed: Annotated[int, Range(ge=0, lt=2**32)] = 0,
    ):
        if task == "superres" and image_size % 4:
            raise ConfigError("data.image_size", f"superres averages 4x4 blocks: needs a multiple of 4, got {image_size}")
        super().__init__(batch_size, num_workers, image_size, val_fraction, test_fraction, split_seed)
        self.task = task

    def info(self) -> dict[str, Any]:
        s = self.image_size
        return {"input_shape": (1, s, s), "num_classes": 10, "targets_are_digits": self.task != "outline"}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        sets = {}
        for name, (x, y) in self._splits().items():
            if self.task == "outline":
                inputs, targets = x, outline(x)
            else:
                inputs, targets = PAIRED[self.task](x), x
            sets[name] = PairedTensors(inputs, targets, y)
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]


@register_data("digit_domains", description="unpaired digit domains for CycleGAN: digits <-> thickened or "
               "inverted digits from disjoint halves (val/test: true pairs for scoring)")
class DigitDomainsDataModule(_DigitTaskModule):
    def __init__(
        self,
        task: DomainTask = "thicken",
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 32,
        num_workers: Annotated[int, Range(ge=0, le=256)] = 0,
        image_size: ImageSize = 16,
        val_fraction: Fraction = 0.15,
        test_fraction: Fraction = 0.15,
        split_seed: Annotated[int, Range(ge=0, lt=2**32)] = 0,
    ):
        super().__init__(batch_size, num_workers, image_size, val_fraction, test_fraction, split_seed)
        self.task = task
        self.transform = DOMAINS[task]

    def info(self) -> dict[str, Any]:
        s = self.image_size
        return {"input_shape": (1, s, s)}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self._splits()
        x = splits["train"][0]
        # Disjoint halves (the split is already shuffled and stratified): A = even rows, B = T(odd rows).
        self.train_set = UnpairedTensors(x[0::2], self.transform(x[1::2]))
        self.val_set = UnpairedPairs(splits["val"][0], self.transform(splits["val"][0]))
        self.test_set = UnpairedPairs(splits["test"][0], self.transform(splits["test"][0]))
