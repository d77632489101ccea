"""GAN networks (plain nn.Modules, tensors in and out; images live in [-1, 1]).

* `DCGenerator`     z (B, Z) [+ class y] -> image (B, C, S, S), S = 4 * 2^k: a linear layer to a
                    4x4 map, then k ConvTranspose(4, stride 2) + BatchNorm + ReLU doublings, tanh out
                    (DCGAN, Radford et al. 2016). Conditional: z is concatenated with an embedding of y.
* `DCDiscriminator` image (B, C, S, S) [+ y] -> one logit/score (B,): stride-2 conv + LeakyReLU(0.2)
                    halvings down to 4x4, features phi(x), then w^T phi(x) (+ <e_y, phi(x)>, the
                    projection discriminator of Miyato & Koyama 2018, when conditional).
* `UNet`            pix2pix / CycleGAN generator (Ronneberger 2015; Isola et al. 2017): encoder
                    e_1..e_D of stride-2 convs, decoder that concatenates e_i to the upsampled map
                    (skip connections carry the fine detail past the bottleneck).
* `PatchDiscriminator` (B, C, S, S) -> a map of logits (B, 1, h, w), each judging one receptive-field
                    patch (PatchGAN); `receptive_field()` gives its side.

Normalisation of a discriminator: "batch", "layer" (GroupNorm with one group: per sample, so the
WGAN-GP per-sample gradient penalty stays valid) or "none"; `spectral=True` wraps every conv/linear
(and the class embedding) in torch.nn.utils.parametrizations.spectral_norm: W / sigma_max(W), sigma
estimated by one power iteration per training forward.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

Norm = Literal["none", "batch", "layer", "instance"]


def doublings(image_size: int, start: int = 4) -> int:
    """k with image_size = start * 2^k, k >= 1 (ValueError otherwise)."""
    k = round(math.log2(image_size / start)) if image_size >= start else -1
    if k < 1 or start * 2**k != image_size:
        raise ValueError(f"image side must be {start} * 2^k with k >= 1 (8, 16, 32, ...), got {image_size}")
    return k


def norm_layer(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # normalises over (C, H, W) of each sample
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Reparametrise every Conv/ConvTranspose/Linear/Embedding weight as W / sigma_max(W)."""
    for m in list(module.modules()):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            spectral_norm(m)
    return module


# ---------------------------------------------------------------- noise -> image
class DCGenerator(nn.Module):
    def __init__(self, z_dim: int, out_channels: int, image_size: int, width: int = 32,
                 num_classes: int = 0, embed_dim: int = 16):
        super().__init__()
        k = doublings(image_size)
        self.z_dim, self.num_classes = z_dim, num_classes
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        c = width * 2**k  # channels of the 4x4 map; halved at every doubling, `width` at S x S
        self.c0 = c
        self.project = nn.Sequential(nn.Linear(z_dim + (embed_dim if num_classes else 0), c * 16, bias=False),
                                     nn.BatchNorm1d(c * 16), nn.ReLU())
        ups = []
        for _ in range(k):
            ups += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU()]
            c //= 2
        self.up = nn.Sequential(*ups)
        self.out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            if y is None:
                raise ValueError("a conditional generator needs class labels y")
            z = torch.cat([z, self.embed(y)], dim=1)  # (B, Z + E)
        h = self.project(z).view(len(z), self.c0, 4, 4)  # (B, c0, 4, 4)
        return torch.tanh(self.out(self.up(h)))  # (B, C, S, S) in [-1, 1]


class DCDiscriminator(nn.Module):
    def __init__(self, in_channels: int, image_size: int, width: int = 32, norm: Norm = "none",
                 spectral: bool = False, num_classes: int = 0):
        super().__init__()
        k = doublings(image_size)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
        c = width
        for _ in range(k):  # S -> S/2 -> ... -> 4
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1), norm_layer(norm, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        self.features = nn.Sequential(*layers, nn.Flatten())  # phi(x): (B, c * 16)
        self.head = nn.Linear(c * 16, 1)
        self.embed = nn.Embedding(num_classes, c * 16) if num_classes else None
        if spectral:
            apply_spectral_norm(self)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        phi = self.features(x)  # (B, F)
        out = self.head(phi).squeeze(1)  # (B,)
        if self.embed is not None:
            if y is None:
                raise ValueError("a conditional discriminator needs class labels y")
            out = out + (self.embed(y) * phi).sum(1)  # projection: + <e_y, phi(x)>
        return out


# ---------------------------------------------------------------- image -> image
class UNet(nn.Module):
    """(B, C_in, S, S) -> (B, C_out, S, S) in [-1, 1]; S divisible by 2^depth.

    down_i: Conv(4, stride 2) [+norm] + LeakyReLU(0.2)      e_i at S / 2^i, i = 1..depth
    up_i:   ConvTranspose(4, stride 2) + norm + ReLU [+dropout] on [u_{i+1}; e_i] (concatenation
            when `skips`, else u_{i+1} alone: an encoder-decoder whose only path is the bottleneck)
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 32, depth: int = 3,
                 norm: Norm = "batch", skips: bool = True, dropout: float = 0.0):
        super().__init__()
        self.skips = skips
        chans = [min(width * 2**i, width * 8) for i in range(depth)]  # channels of e_1..e_D
        self.down = nn.ModuleList()
        c_in = in_channels
        for i, c in enumerate(chans):
            self.down.append(nn.Sequential(
                nn.Conv2d(c_in, c, 4, 2, 1), norm_layer(norm, c) if 0 < i < depth - 1 else nn.Identity(),
                nn.LeakyReLU(0.2)))
            c_in = c
        self.up = nn.ModuleList()
        for i in reversed(range(1, depth)):  # u_i = up(u_{i+1} [; e_{i+1}]), same channels as e_i
            c_from = chans[i] * (2 if skips and i < depth - 1 else 1)
            self.up.append(nn.Sequential(
                nn.ConvTranspose2d(c_from, chans[i - 1], 4, 2, 1), norm_layer(norm, chans[i - 1]), nn.ReLU(),
                nn.Dropout(dropout) if dropout > 0 and i >= depth - 2 else nn.Identity()))
        c_last = chans[0] * (2 if skips and depth > 1 else 1)
        self.out = nn.ConvTranspose2d(c_last, out_channels, 4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % 2 ** len(self.down) or x.shape[-2] % 2 ** len(self.down):
            raise ValueError(f"U-Net of depth {len(self.down)} needs sides divisible by {2 ** len(self.down)}, "
                             f"got {tuple(x.shape[-2:])}")
        enc = []
        h = x
        for down in self.down:
            h = down(h)
            enc.append(h)  # e_1 (S/2) ... e_D (S/2^D)
        u = enc[-1]
        for j, up in enumerate(self.up):
            u = up(u)  # at the resolution of e_{D-1-j}
            if self.skips:
                u = torch.cat([u, enc[-2 - j]], dim=1)
        return torch.tanh(self.out(u))


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN: (B, C, S, S) -> logits (B, 1, S / 2^n, S / 2^n), n = `stride_layers`:
    n stride-2 convs (4x4), then two stride-1 3x3 convs; each logit sees a receptive_field()^2 patch."""

    def __init__(self, in_channels: int, width: int = 32, stride_layers: int = 1, norm: Norm = "batch",
                 spectral: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, c = in_channels, width
        self.kernels: list[tuple[int, int]] = []  # (kernel, stride) per conv, for receptive_field()
        for i in range(stride_layers):
            layers += [nn.Conv2d(c_in, c, 4, 2, 1), norm_layer(norm, c) if i else nn.Identity(), nn.LeakyReLU(0.2)]
            self.kernels.append((4, 2))
            c_in, c = c, min(2 * c, 8 * width)
        layers += [nn.Conv2d(c_in, c, 3, 1, 1), norm_layer(norm, c), nn.LeakyReLU(0.2), nn.Conv2d(c, 1, 3, 1, 1)]
        self.kernels += [(3, 1), (3, 1)]
        self.net = nn.Sequential(*layers)
        if spectral:
            apply_spectral_norm(self)

    def receptive_field(self) -> int:
        """Side of the input patch one output logit depends on: r <- (r - 1) * stride + kernel, from the top."""
        r = 1
        for k, s in reversed(self.kernels):
            r = (r - 1) * s + k
        return r

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 1, h, w) patch logits
