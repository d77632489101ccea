"""The registered `ncsn` LightningModule: a noise-conditional score network (Song & Ermon 2019)
trained by denoising score matching and sampled by annealed Langevin dynamics.

Noise levels: sigma_1 > ... > sigma_L geometric (schedules.GeometricSigmas). The score of the
perturbed data p_sigma(x~) = int p(x) N(x~; x, sigma^2 I) dx is learned by denoising score matching:
grad log N(x~; x, sigma^2 I) = -(x~ - x) / sigma^2 = -z / sigma for x~ = x + sigma z, so

    l(theta; sigma) = 1/2 E || s_theta(x + sigma z, sigma) + z / sigma ||^2,
    L = E_sigma [ sigma^2 l(theta; sigma) ] = 1/2 E || sigma s_theta(x~, sigma) + z ||^2

(lambda(sigma) = sigma^2 makes every level weigh the same; the mean is over pixels and the batch).
Following NCSNv2 (Song & Ermon 2020) the network is s_theta(x, sigma) = UNet(x, c(sigma)) / sigma,
with c(sigma) = 1000 log(sigma_1 / sigma) / log(sigma_1 / sigma_L) in the U-Net's sinusoidal embedding:
sigma s_theta is then a noise predictor, the counterpart of DDPM's eps_theta (up to its sign).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor

from litlab.chapters.diffusion.base import DiffusionBase
from litlab.chapters.diffusion.module import (CHAPTER, Channels, Decay, ImageShape, Mults, Unit, build_unet)
from litlab.chapters.diffusion.samplers import AnnealedLangevin
from litlab.chapters.diffusion.schedules import GeometricSigmas
from litlab.errors import ConfigError
from litlab.registry import register_model
from litlab.schema import Range

Sigma = Annotated[float, Range(gt=0, le=1000)]


@register_model(
    "ncsn",
    chapter=CHAPTER,
    description="NCSN score network over geometric noise levels (denoising score matching), "
                "sampled by annealed Langevin dynamics",
    smoke={"model": {"num_levels": 4, "steps_per_level": 2, "base_channels": 8, "num_eval_samples": 8},
           "data": {"name": "digits", "normalize": False, "batch_size": 16}},
)
class NCSN(DiffusionBase):
    def __init__(
        self,
        input_shape: ImageShape,
        sigma_max: Sigma = 10.0,  # sigma_1: about the largest distance between two training images
        sigma_min: Sigma = 0.01,  # sigma_L
        num_levels: Annotated[int, Range(ge=2, le=10_000)] = 20,  # L
        steps_per_level: Annotated[int, Range(ge=1, le=100_000)] = 20,  # Langevin steps per sigma
        step_lr: Annotated[float, Range(gt=0, le=1)] = 2e-5,  # epsilon: alpha_i = epsilon sigma_i^2 / sigma_L^2
        denoise_final: bool = True,  # one last step x + sigma_L^2 s(x, sigma_L) (Tweedie)
        base_channels: Channels = 32,
        channel_mults: Mults = [1, 2],  # noqa: B006 (schema default, never mutated)
        num_res_blocks: Annotated[int, Range(ge=1, le=8)] = 1,
        attention: bool = False,
        dropout: Unit = 0.0,
        ema_decay: Decay = 0.999,
        sample_every_n_epochs: Annotated[int, Range(ge=1)] = 10,
        num_eval_samples: Annotated[int, Range(ge=2, le=100_000)] = 500,
        sample_seed: Annotated[int, Range(ge=0, lt=2**63)] = 0,
    ):
        super().__init__(ema_decay, sample_every_n_epochs, num_eval_samples, sample_seed)
        self.save_hyperparameters()
        if sigma_min >= sigma_max:
            raise ConfigError("model.sigma_min", f"must be below sigma_max={sigma_max}, got {sigma_min}")
        self.input_shape = tuple(input_shape)
        self.sigmas = GeometricSigmas(sigma_max, sigma_min, num_levels)
        self.net = build_unet(input_shape, base_channels, channel_mults, num_res_blocks, attention, dropout)
        self.init_ema()

    def _cond(self, sigma: Tensor) -> Tensor:
        """c(sigma) in [0, 1000]: 0 at sigma_1, 1000 at sigma_L (log-linear, like the levels)."""
        h = self.hparams
        return 1000 * torch.log(h.sigma_max / sigma) / math.log(h.sigma_max / h.sigma_min)

    def score(self, x: Tensor, sigma: Tensor) -> Tensor:
        """s_theta(x, sigma) = UNet(x, c(sigma)) / sigma: (B, C, H, W), sigma (B,) -> (B, C, H, W)."""
        return self.net(x, self._cond(sigma)) / sigma.view(-1, *([1] * (x.ndim - 1)))

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.score(x, sigma)

    def smoke_forward(self, batch) -> Tensor:
        x = batch[0] * 2 - 1
        sigma = torch.full((x.shape[0],), float(self.sigmas[len(self.sigmas) // 2]))
        return self(x + sigma.view(-1, 1, 1, 1) * torch.randn_like(x), sigma)

    def loss(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b = x.shape[0]
        level = torch.randint(0, len(self.sigmas), (b,), device=x.device, generator=generator)  # (B,)
        sigma = self.sigmas.sigmas.to(x.device, x.dtype)[level]  # (B,)
        z = torch.randn(x.shape, device=x.device, generator=generator)
        x_noisy = x + sigma.view(-1, 1, 1, 1) * z
        sigma_score = self.net(x_noisy, self._cond(sigma))  # = sigma * s_theta(x~, sigma)
        return 0.5 * ((sigma_score + z) ** 2).mean()  # 1/2 E || sigma s + z ||^2

    def make_sampler(self, steps_per_level: int | None = None, step_lr: float | None = None) -> AnnealedLangevin:
        h = self.hparams
        return AnnealedLangevin(self.sigmas, steps_per_level or h.steps_per_level, step_lr or h.step_lr,
                                h.denoise_final)

    def sample(self, n: int, labels: Tensor | None = None, generator: torch.Generator | None = None,
               trajectory: list | None = None, steps_per_level: int | None = None,
               step_lr: float | None = None) -> Tensor:
        sigmas = self.sigmas.sigmas.to(self.device, torch.float32)
        init = float(sigmas[0]) * torch.randn((n, *self.input_shape), generator=generator, device=self.device)
        score_fn = lambda x, level: self.score(x, sigmas[level])  # noqa: E731
        return self.make_sampler(steps_per_level, step_lr).sample(score_fn, init, generator, trajectory)

    def trajectory_label(self, t: int) -> str:
        if t < 0:
            return "init"
        if t >= len(self.sigmas):
            return "denoised"
        return f"s={float(self.sigmas[t]):.2g}"

    def _quick_options(self) -> dict:
        return {"steps_per_level": 1} if self._is_fast_dev_run() else {}
