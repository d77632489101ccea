"""Plain nn.Modules and functions of the autoencoder chapter (tensors in, tensors out; no Lightning).

Encoders map images (B, C, H, W) to a vector (B, out_dim): the code z of a deterministic
autoencoder, or (mu, log sigma^2) of a VAE's Gaussian q(z|x) (out_dim = 2 * latent_dim). Decoders map
z (B, latent_dim) to per-pixel logits (B, C, H, W): the Bernoulli parameter is sigmoid(logits), the
Gaussian mean is sigmoid(logits) too (pixels live in [0, 1]).
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Likelihood = Literal["bernoulli", "gaussian"]


# ---- networks ---------------------------------------------------------------------------------

def _mlp(sizes: list[int]) -> list[nn.Module]:
    """Linear layers through `sizes`, ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return layers


class MLPEncoder(nn.Sequential):
    def __init__(self, input_shape: tuple[int, int, int], hidden: list[int], out_dim: int):
        super().__init__(nn.Flatten(), *_mlp([math.prod(input_shape), *hidden, out_dim]))  # (B, C*H*W) -> (B, out)


class MLPDecoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], hidden: list[int], latent_dim: int):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.net = nn.Sequential(*_mlp([latent_dim, *reversed(hidden), math.prod(input_shape)]))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(len(z), *self.input_shape)  # (B, latent) -> logits (B, C, H, W)


def conv_grid(input_shape: tuple[int, int, int], channels: list[int]) -> tuple[int, int]:
    """(H, W) after len(channels) stride-2 convs; ValueError unless every one halves exactly."""
    _, h, w = input_shape
    k = 2 ** len(channels)
    if h % k or w % k:
        raise ValueError(f"{len(channels)} stride-2 convs need H and W divisible by {k}, got {h}x{w}")
    return h // k, w // k


class ConvEncoder(nn.Module):
    """conv4x4 stride 2 (+ReLU) per entry of `channels` (8x8 -> 4x4 -> 2x2 for two), flatten, linear."""

    def __init__(self, input_shape: tuple[int, int, int], channels: list[int], out_dim: int):
        super().__init__()
        gh, gw = conv_grid(input_shape, channels)
        layers: list[nn.Module] = []
        prev = input_shape[0]
        for ch in channels:
            layers += [nn.Conv2d(prev, ch, 4, stride=2, padding=1), nn.ReLU()]
            prev = ch
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(prev * gh * gw, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.convs(x).flatten(1))  # (B, C, H, W) -> (B, ch, H/2^L, W/2^L) -> (B, out)


class ConvDecoder(nn.Module):
    """The mirror image: linear to (ch_last, H/2^L, W/2^L), transposed conv4x4 stride 2 per level
    (each doubles H and W), the last one to C logit channels."""

    def __init__(self, input_shape: tuple[int, int, int], channels: list[int], latent_dim: int):
        super().__init__()
        gh, gw = conv_grid(input_shape, channels)
        self.grid = (channels[-1], gh, gw)
        self.fc = nn.Sequential(nn.Linear(latent_dim, math.prod(self.grid)), nn.ReLU())
        outs = [*reversed(channels[:-1]), input_shape[0]]
        layers: list[nn.Module] = []
        prev = channels[-1]
        for i, ch in enumerate(outs):
            layers.append(nn.ConvTranspose2d(prev, ch, 4, stride=2, padding=1))
            if i < len(outs) - 1:
                layers.append(nn.ReLU())
            prev = ch
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.deconvs(self.fc(z).view(len(z), *self.grid))  # (B, latent) -> logits (B, C, H, W)


def build_encoder(arch: str, input_shape, hidden: list[int], channels: list[int], out_dim: int) -> nn.Module:
    if arch == "mlp":
        return MLPEncoder(input_shape, hidden, out_dim)
    return ConvEncoder(input_shape, channels, out_dim)


def build_decoder(arch: str, input_shape, hidden: list[int], channels: list[int], latent_dim: int) -> nn.Module:
    if arch == "mlp":
        return MLPDecoder(input_shape, hidden, latent_dim)
    return ConvDecoder(input_shape, channels, latent_dim)


# ---- the course equations ---------------------------------------------------------------------

def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I): a sample of N(mu, sigma^2) that is a differentiable
    function of (mu, sigma), so the ELBO's gradient reaches the encoder through z."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) = -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2), per row: (B,)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)


def neg_log_likelihood(logits: Tensor, x: Tensor, likelihood: Likelihood, sigma: float = 0.1) -> Tensor:
    """-log p(x | z) summed over pixels, per image (B,), for decoder `logits` (B, C, H, W).

    bernoulli: sum BCE(sigmoid(logits), x) (x in [0, 1]: grey levels are soft targets).
    gaussian:  p(x|z) = N(x; sigmoid(logits), sigma^2 I):
               sum (x - mean)^2 / (2 sigma^2) + D/2 log(2 pi sigma^2), D pixels.
    """
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1)
    mean = torch.sigmoid(logits)
    d = x[0].numel()
    sq = (x - mean).pow(2).flatten(1).sum(-1)
    return sq / (2 * sigma**2) + 0.5 * d * math.log(2 * math.pi * sigma**2)


def mean_image(logits: Tensor) -> Tensor:
    """E[x | z] under both likelihoods: sigmoid(logits), in [0, 1]."""
    return torch.sigmoid(logits)


def log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dim: (B,)."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


class GaussianVAE(nn.Module):
    """Encoder -> (mu, log sigma^2) of q(z|x) = N(mu, diag sigma^2); prior p(z) = N(0, I);
    decoder -> logits of p(x|z)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int):
        super().__init__()
        self.encoder, self.decoder, self.latent_dim = encoder, decoder, latent_dim

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=-1)  # (B, latent) each
        return mu, logvar

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> (logits (B, C, H, W), z, mu, logvar), z one reparameterised sample per image."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar)
        return self.decoder(z), z, mu, logvar

    @torch.no_grad()
    def importance_log_likelihood(self, x: Tensor, likelihood: Likelihood, sigma: float = 0.1,
                                  k: int = 100) -> Tensor:
        """Importance-sampled estimate of log p(x) per image (B,), with q(z|x) as the proposal:
        log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x) (the IWAE bound; K=1 is the ELBO in
        expectation, and it tightens towards log p(x) as K grows)."""
        mu, logvar = self.encode(x)  # (B, L)
        zs = mu + torch.exp(0.5 * logvar) * torch.randn(k, *mu.shape, device=mu.device)  # (K, B, L)
        flat = zs.reshape(-1, mu.shape[-1])  # (K*B, L)
        xs = x.unsqueeze(0).expand(k, *x.shape).reshape(-1, *x.shape[1:])  # (K*B, C, H, W)
        log_px_z = -neg_log_likelihood(self.decoder(flat), xs, likelihood, sigma).view(k, -1)  # (K, B)
        log_pz = log_normal(zs, torch.zeros_like(zs), torch.zeros_like(zs))  # (K, B)
        log_qz = log_normal(zs, mu.expand_as(zs), logvar.expand_as(zs))  # (K, B)
        return torch.logsumexp(log_px_z + log_pz - log_qz, dim=0) - math.log(k)
