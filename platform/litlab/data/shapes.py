"""Synthetic object detection: coloured squares, circles and triangles on a noisy background.

Every image (3, S, S) holds between `min_objects` and `max_objects` shapes of random class, side
(`min_size`..`max_size` pixels), position and colour, on a random dark background level plus
Gaussian pixel noise. Shapes never overlap (their boxes keep >= `gap` pixels apart), so every pixel
of the class colour in a box belongs to that box's shape. Generation is vectorised over images,
seeded by `seed` (independent of the run seed), done once in setup() and kept in memory as uint8.

Targets: a PADDED float tensor (max_objects, 5) per image, rows [x1, y1, x2, y2, label] for the
objects then rows of -1 for the empty slots. Boxes are in pixels, x along the width, with pixel
edges as coordinates: a shape covering pixel columns u0..u1 (inclusive) has x1 = u0, x2 = u1 + 1,
so 0 <= x1 < x2 <= S. Because every image pads to the same max_objects, the default batching works:
a batch is (images float32 (B, 3, S, S) in [0, 1], targets float32 (B, max_objects, 5)), with no
custom collate; `unpad(targets)` turns it into per-image (boxes (n, 4), labels (n,)) pairs.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor

from litlab.data.base import LitlabDataModule
from litlab.data.memory import FastLoaderMixin, TensorBatchDataset
from litlab.errors import ConfigError
from litlab.registry import register_data
from litlab.schema import Range

CLASS_NAMES = ("square", "circle", "triangle")
Count = Annotated[int, Range(ge=1, le=10_000_000)]


def shape_masks(kind: Tensor, x0: Tensor, y0: Tensor, size: Tensor, image_size: int) -> Tensor:
    """Boolean masks (..., S, S) of shapes with class `kind` (0 square, 1 circle, 2 triangle),
    top-left corner (x0, y0) and side `size` in pixels; every argument has the same shape (...).
    A pixel (row v, column u) is in the shape when its centre (u + 0.5, v + 0.5) is."""
    c = torch.arange(image_size, dtype=torch.float32) + 0.5
    px = (c - x0[..., None].float()).unsqueeze(-2)  # (..., 1, S): column centre relative to x0
    py = (c - y0[..., None].float()).unsqueeze(-1)  # (..., S, 1): row centre relative to y0
    s = size[..., None, None].float()
    k = kind[..., None, None]
    inside = (px >= 0) & (px < s) & (py >= 0) & (py < s)  # the square [x0, x0+s) x [y0, y0+s)
    circle = (px - s / 2) ** 2 + (py - s / 2) ** 2 <= (s / 2) ** 2
    triangle = (px - s / 2).abs() <= py / 2  # apex (s/2, 0) at the top, base y = s from x = 0 to s
    return inside & torch.where(k == 0, True, torch.where(k == 1, circle, triangle))


def make_shapes(n: int, image_size: int = 64, min_objects: int = 1, max_objects: int = 3, min_size: int = 10,
                max_size: int = 24, noise: float = 0.05, gap: int = 2, seed: int = 0, tries: int = 30,
                chunk: int = 512) -> dict[str, Tensor]:
    """`n` images. Returns images uint8 (n, 3, S, S), targets float32 (n, max_objects, 5) padded
    with -1 (see module doc), colors float32 (n, max_objects, 3) (the shapes' RGB in [0, 1], before
    noise; -1 for empty slots). Same arguments -> same tensors."""
    g = torch.Generator().manual_seed(seed)
    S, K = image_size, max_objects
    count = torch.randint(min_objects, max_objects + 1, (n,), generator=g)  # objects wanted per image
    size = torch.randint(min_size, max_size + 1, (n, K), generator=g)
    kind = torch.randint(0, len(CLASS_NAMES), (n, K), generator=g)
    # Placement, slot by slot for all images at once: `tries` random corners, keep the first whose
    # box (grown by `gap`) misses every box already placed; a slot with no such corner stays empty.
    u = torch.rand(n, K, tries, 2, generator=g)
    corner = (u * (S - size + 1)[..., None, None]).long()  # (n, K, tries, 2): x0, y0 in [0, S - size]
    placed = torch.zeros(n, K, dtype=torch.bool)
    xy = torch.zeros(n, K, 2, dtype=torch.long)
    for j in range(K):
        lo, hi = corner[:, j], corner[:, j] + size[:, j, None, None]  # (n, tries, 2)
        ok = torch.ones(n, tries, dtype=torch.bool)
        for i in range(j):  # separated along x or along y from slot i (if it was placed)
            sep = ((lo >= xy[:, i, None] + size[:, i, None, None] + gap)
                   | (hi + gap <= xy[:, i, None])).any(-1)  # (n, tries)
            ok &= sep | ~placed[:, i, None]
        first = ok.float().argmax(1)  # first valid try (0 if none; then ok.any() is False)
        xy[:, j] = corner[torch.arange(n), j, first]
        placed[:, j] = ok.any(1) & (j < count)
    # Colours: the brightest channel in [0.6, 1]; the background level in [0, 0.35] per channel.
    rgb = torch.rand(n, K, 3, generator=g)
    rgb = rgb * (0.6 + 0.4 * torch.rand(n, K, 1, generator=g)) / rgb.amax(-1, keepdim=True).clamp_min(1e-6)
    background = 0.3 * torch.rand(n, 1, 1, 1, generator=g) + 0.05 * torch.rand(n, 3, 1, 1, generator=g)
    images = torch.empty(n, 3, S, S, dtype=torch.uint8)
    targets = torch.full((n, K, 5), -1.0)
    for a in range(0, n, chunk):  # bounded memory: masks of `chunk` images at a time
        b = min(n, a + chunk)
        masks = shape_masks(kind[a:b], xy[a:b, :, 0], xy[a:b, :, 1], size[a:b], S) & placed[a:b, :, None, None]
        img = background[a:b].expand(b - a, 3, S, S).clone()  # (m, 3, S, S)
        for j in range(K):  # shapes are disjoint: plain overwrite
            img = torch.where(masks[:, j, None], rgb[a:b, j, :, None, None], img)
        img = img + noise * torch.randn(img.shape, generator=g)
        images[a:b] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        # The box of the drawn pixels (tight), not of the nominal square: rows / columns hit by the mask.
        cols, rows = masks.any(-2), masks.any(-1)  # (m, K, S) each
        ar = torch.arange(S)
        x1 = torch.where(cols, ar, S).amin(-1)
        x2 = torch.where(cols, ar, -1).amax(-1) + 1
        y1 = torch.where(rows, ar, S).amin(-1)
        y2 = torch.where(rows, ar, -1).amax(-1) + 1
        box = torch.stack([x1, y1, x2, y2, kind[a:b]], -1).float()  # (m, K, 5)
        targets[a:b] = torch.where(placed[a:b, :, None], box, -1.0)
    colors = torch.where(placed[..., None], rgb, -1.0)
    # Objects first, padding last, in each image's row of targets.
    order = (~placed).float().argsort(dim=1, stable=True)
    targets = targets.gather(1, order[..., None].expand(-1, -1, 5))
    colors = colors.gather(1, order[..., None].expand(-1, -1, 3))
    return {"images": images, "targets": targets, "colors": colors}


def unpad(targets: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Padded targets (B, M, 5) -> per image (boxes float (n, 4) xyxy pixels, labels long (n,))."""
    out = []
    for t in targets:
        t = t[t[:, 4] >= 0]
        out.append((t[:, :4], t[:, 4].long()))
    return out


def to_float(images: Tensor) -> Tensor:
    """uint8 (B, 3, S, S) -> float32 in [0, 1] (per batch, in the loader)."""
    return images.float() / 255.0


@register_data("shapes", description="Generated detection data: 1-3 coloured squares/circles/triangles per "
               "noisy image, boxes + labels (padded targets), seeded")
class ShapesDataModule(FastLoaderMixin, LitlabDataModule):
    class_names = CLASS_NAMES

    def __init__(
        self,
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 32,
        num_workers: Annotated[int, Range(ge=0, le=256)] = 0,
        image_size: Annotated[int, Range(ge=16, le=1024)] = 64,
        n_train: Count = 2000,
        n_val: Count = 300,
        n_test: Count = 500,
        min_objects: Annotated[int, Range(ge=0, le=100)] = 1,
        max_objects: Annotated[int, Range(ge=1, le=100)] = 3,
        min_size: Annotated[int, Range(ge=3, le=1024)] = 10,  # side of a shape, pixels
        max_size: Annotated[int, Range(ge=3, le=1024)] = 24,
        noise: Annotated[float, Range(ge=0, le=1)] = 0.05,  # std of the Gaussian pixel noise
        seed: Annotated[int, Range(ge=0, lt=2**32)] = 0,  # generates the data; independent of the run seed
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if min_objects > max_objects:
            raise ConfigError("data.min_objects", f"{min_objects} > data.max_objects = {max_objects}")
        if min_size > max_size:
            raise ConfigError("data.min_size", f"{min_size} > data.max_size = {max_size}")
        if max_size > image_size // 2:
            raise ConfigError("data.max_size", f"{max_size} leaves no room for several shapes in a "
                              f"{image_size}x{image_size} image: at most image_size // 2 = {image_size // 2}")
        self.image_size, self.noise, self.seed = image_size, noise, seed
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.min_objects, self.max_objects = min_objects, max_objects
        self.min_size, self.max_size = min_size, max_size

    def info(self) -> dict[str, Any]:
        return {"input_shape": (3, self.image_size, self.image_size), "num_classes": len(CLASS_NAMES),
                "class_names": list(CLASS_NAMES)}

    def generate(self, n: int, seed: int) -> dict[str, Tensor]:
        return make_shapes(n, self.image_size, self.min_objects, self.max_objects, self.min_size, self.max_size,
                           self.noise, seed=seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = []
        for i, n in enumerate((self.n_train, self.n_val, self.n_test)):  # one seed per split
            d = self.generate(n, seed=self.seed * 3 + i)
            splits.append(TensorBatchDataset(d["images"], d["targets"], transform=to_float))
        self.train_set, self.val_set, self.test_set = splits
