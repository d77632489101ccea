"""Batched tensor augmentations: small callable objects, (B, C, H, W) in -> (B, C, h, w) out.

They draw one random setting per image of the batch with plain tensor ops (no PIL, no loop over
images), on the input's device: the same object runs in a loader worker on CPU or on a GPU batch
(e.g. in a DataModule's `on_after_batch_transfer`). Integer (uint8) and float batches both work.

Randomness: pass `generator=torch.Generator(device).manual_seed(s)` for a reproducible stream
(the draws are made on the generator's device and moved to the input's). Without one they use
torch's global RNG, which the runner seeds (`seed_everything(seed, workers=True)`) and Lightning
re-seeds differently in each loader worker; a generator held by the object would be copied into
every worker and give each worker the SAME crops, so leave it None when num_workers > 0.

The image DataModules apply them to TRAINING batches only (val/test see the images as they are):
- cifar10: RandomCrop(32, padding=4) + RandomHorizontalFlip(0.5) on the uint8 images, before the
  normalisation, i.e. the standard CIFAR recipe (He et al. 2015, section 4.2).
- digits keeps its own `RandomShift(1)` (litlab.data.digits), which is a RandomCrop(8, padding=1)
  whose border is the background value. No flip: a mirrored 2, 3, 4, 7 or 9 is not a digit any
  more (and a mirrored 5 looks like a 2), so flipping would teach the net wrong labels; larger crops
  cut strokes off an 8x8 digit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def _randint(high: int, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """n integers uniform in [0, high), drawn on the generator's device, returned on `device`."""
    if generator is None:
        return torch.randint(0, high, (n,), device=device)
    return torch.randint(0, high, (n,), device=generator.device, generator=generator).to(device)


def _rand(n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, device=generator.device, generator=generator).to(device)


class RandomCrop:
    """Pad every side by `padding`, then cut a random `size` window out of each image.

    x: (B, C, H, W) -> (B, C, h, w), (h, w) = size (default (H, W): with padding p, a random shift
    of each image by (dy, dx) in [-p, p]^2, the uncovered border filled). padding_mode: constant
    (with `fill`, a number or one per channel, e.g. the normalised value of black), reflect or
    replicate (as F.pad)."""

    def __init__(self, size: int | tuple[int, int] | None = None, padding: int = 0,
                 fill: float | Sequence[float] = 0.0,
                 padding_mode: Literal["constant", "reflect", "replicate"] = "constant",
                 generator: torch.Generator | None = None):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        if padding_mode not in ("constant", "reflect", "replicate"):
            raise ValueError(f"unknown padding_mode {padding_mode!r}")
        self.size = (size, size) if isinstance(size, int) else size
        self.padding, self.fill, self.padding_mode, self.generator = padding, fill, padding_mode, generator

    def _pad(self, x: Tensor) -> Tensor:
        p = self.padding
        if p == 0:
            return x
        if self.padding_mode != "constant":
            return F.pad(x, (p, p, p, p), mode=self.padding_mode)
        b, c, h, w = x.shape
        fill = torch.as_tensor(self.fill, dtype=torch.float32).reshape(1, -1, 1, 1)  # (1, 1 or C, 1, 1)
        out = fill.to(device=x.device, dtype=x.dtype).expand(b, c, h + 2 * p, w + 2 * p).clone()
        out[:, :, p:p + h, p:p + w] = x
        return out  # (B, C, H+2p, W+2p)

    def __call__(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        th, tw = self.size or (h, w)
        padded = self._pad(x)
        ph, pw = padded.shape[-2:]
        if th > ph or tw > pw:
            raise ValueError(f"crop {th}x{tw} is larger than the padded image {ph}x{pw}")
        top = _randint(ph - th + 1, b, x.device, self.generator)  # (B,) window corners
        left = _randint(pw - tw + 1, b, x.device, self.generator)
        rows = (top[:, None] + torch.arange(th, device=x.device))[:, None, :, None]  # (B, 1, th, 1)
        cols = (left[:, None] + torch.arange(tw, device=x.device))[:, None, None, :]  # (B, 1, 1, tw)
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, chan, rows, cols]  # (B, C, th, tw)

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding}, padding_mode={self.padding_mode!r})"


class RandomHorizontalFlip:
    """Mirror each image left-right with probability p: x[..., ::-1] where the coin says so."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p, self.generator = p, generator

    def __call__(self, x: Tensor) -> Tensor:
        flip = _rand(x.shape[0], x.device, self.generator) < self.p  # (B,)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply batch transforms in order: Compose([crop, flip, standardize])(x)."""

    def __init__(self, transforms: Sequence[Callable[[Tensor], Tensor]]):
        self.transforms = list(transforms)

    def __call__(self, x: Tensor) -> Tensor:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(map(repr, self.transforms)) + "])"
