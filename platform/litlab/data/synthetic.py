"""Synthetic data generated in memory from a seed: 1-D function regression and separable blobs.

function1d: y = f(x), x ~ U(x_low, x_high); items `(x float32 (1,), y float32 (1,))`. Gaussian
`noise` is added to the TRAIN targets only, so val/test measure how well f itself is approximated.

blobs: `num_classes` blobs in `n_features` dims; items `(x float32 (n_features,), y int64 ())`.
Every point lies within `radius` (= 1) of its class centre and the centres are at least
2 * (radius + separation) apart, so the nearest-centre rule, a linear classifier
(argmax_k c_k.x - |c_k|^2/2), classifies every point with margin >= `separation`. For 2 classes the
centres are +-c and the boundary is the hyperplane x.c = 0 through the origin (a perceptron without
bias converges, after at most (R / separation)^2 updates, R = |c| + radius).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from litlab.data.base import LitlabDataModule
from litlab.data.memory import FastLoaderMixin, TensorBatchDataset
from litlab.errors import ConfigError
from litlab.registry import register_data
from litlab.schema import Range

Count = Annotated[int, Range(ge=1, le=100_000_000)]
Seed = Annotated[int, Range(ge=0, lt=2**32)]


def _step(x: Tensor) -> Tensor:
    return (x >= 0).to(x.dtype)


def _cubic(x: Tensor) -> Tensor:
    return x**3


def _sawtooth(x: Tensor) -> Tensor:
    """Period pi, values in [-1, 1): 2 teeth on [-pi, pi]."""
    t = x / math.pi
    return 2 * (t - torch.floor(t + 0.5))


TARGETS = {"sin": torch.sin, "abs": torch.abs, "step": _step, "cubic": _cubic, "sawtooth": _sawtooth}


@register_data("function1d", description="1-D regression y = f(x) (sin, abs, step, cubic, sawtooth) "
               "for the universal-approximation experiment")
class Function1DDataModule(FastLoaderMixin, LitlabDataModule):
    def __init__(
        self,
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 64,
        num_workers: Annotated[int, Range(ge=0, le=256)] = 0,
        fn: Literal["sin", "abs", "step", "cubic", "sawtooth"] = "sin",
        n_train: Count = 1024,
        n_val: Count = 256,
        n_test: Count = 256,
        noise: Annotated[float, Range(ge=0, le=1e6)] = 0.0,  # std of Gaussian noise on TRAIN targets
        x_low: float = -math.pi,
        x_high: float = math.pi,
        seed: Seed = 0,  # generates the data; independent of the run seed
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if not x_low < x_high:
            raise ConfigError("data.x_low", f"must be < data.x_high, got x_low={x_low:g}, x_high={x_high:g}")
        self.fn, self.noise, self.seed = fn, noise, seed
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.x_low, self.x_high = x_low, x_high

    def info(self) -> dict[str, Any]:
        return {"input_dim": 1, "output_dim": 1}

    def target_fn(self, x: Tensor) -> Tensor:
        """The noiseless target f, elementwise on any shape (e.g. a (N, 1) grid for a fit plot)."""
        return TARGETS[self.fn](x)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        g = torch.Generator().manual_seed(self.seed)
        splits = []
        for n, noisy in ((self.n_train, True), (self.n_val, False), (self.n_test, False)):
            x = self.x_low + (self.x_high - self.x_low) * torch.rand(n, 1, generator=g)  # (n, 1)
            y = self.target_fn(x)
            if noisy and self.noise > 0:
                y = y + self.noise * torch.randn(n, 1, generator=g)
            splits.append(TensorBatchDataset(x, y))
        self.train_set, self.val_set, self.test_set = splits


def blob_centers(num_classes: int, n_features: int, min_distance: float) -> Tensor:
    """(num_classes, n_features) centres, pairwise >= min_distance apart, centred on the origin:
    evenly on a circle in the first two dims (on a line when n_features == 1)."""
    c = torch.zeros(num_classes, n_features, dtype=torch.float64)
    k = torch.arange(num_classes, dtype=torch.float64)
    if n_features == 1:
        c[:, 0] = (k - (num_classes - 1) / 2) * min_distance
    else:
        rho = min_distance / (2 * math.sin(math.pi / num_classes))  # adjacent chord = min_distance
        angle = 2 * math.pi * k / num_classes
        c[:, 0], c[:, 1] = rho * torch.cos(angle), rho * torch.sin(angle)
    return c


@register_data("blobs", description="Gaussian blobs, linearly separable with a guaranteed margin "
               "(separation), for the perceptron")
class BlobsDataModule(FastLoaderMixin, LitlabDataModule):
    radius = 1.0  # every point is within this distance of its centre

    def __init__(
        self,
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 64,
        num_workers: Annotated[int, Range(ge=0, le=256)] = 0,
        n_samples: Annotated[int, Range(ge=10, le=100_000_000)] = 512,  # all splits together
        n_features: Annotated[int, Range(ge=1, le=100_000)] = 2,
        num_classes: Annotated[int, Range(ge=2, le=10_000)] = 2,
        separation: Annotated[float, Range(gt=0, le=1e6)] = 0.5,  # guaranteed margin (distance to boundary)
        val_fraction: Annotated[float, Range(ge=0.01, le=0.8)] = 0.15,
        test_fraction: Annotated[float, Range(ge=0.01, le=0.8)] = 0.15,
        seed: Seed = 0,  # generates the data; independent of the run seed
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if val_fraction + test_fraction > 0.9:
            raise ConfigError("data.val_fraction", f"val_fraction + test_fraction = {val_fraction + test_fraction:g}: "
                              "must be <= 0.9 to leave a training split")
        self.n_samples, self.n_features, self.num_classes = n_samples, n_features, num_classes
        self.separation, self.seed = separation, seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.centers = blob_centers(num_classes, n_features, 2 * (self.radius + separation)).float()

    def info(self) -> dict[str, Any]:
        return {"input_shape": (self.n_features,), "num_classes": self.num_classes}

    def generate(self) -> tuple[Tensor, Tensor]:
        """All n_samples points, shuffled: x (N, n_features) float32, y (N,) int64, balanced."""
        g = torch.Generator().manual_seed(self.seed)
        n, d = self.n_samples, self.n_features
        y = torch.arange(n) % self.num_classes
        z = torch.randn(n, d, generator=g, dtype=torch.float64) * (self.radius / (2 * math.sqrt(d)))
        norm = z.norm(dim=1, keepdim=True)
        z = z * torch.clamp(self.radius / norm.clamp_min(1e-12), max=1.0)  # truncate to the radius ball
        x = self.centers.double()[y] + z
        perm = torch.randperm(n, generator=g)
        return x[perm].float(), y[perm]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = self.generate()
        n_test = max(1, round(self.test_fraction * len(x)))
        n_val = max(1, round(self.val_fraction * len(x)))
        n_train = len(x) - n_val - n_test
        self.train_set = TensorBatchDataset(x[:n_train], y[:n_train])
        self.val_set = TensorBatchDataset(x[n_train:n_train + n_val], y[n_train:n_train + n_val])
        self.test_set = TensorBatchDataset(x[n_train + n_val:], y[n_train + n_val:])
