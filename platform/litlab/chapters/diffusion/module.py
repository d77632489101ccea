"""The registered `ddpm` LightningModule: DDPM / DDIM / classifier-free guidance on small images.

Training (Ho et al. 2020, Algorithm 1): x_0 from the data (scaled to [-1, 1]), t ~ U{0..T-1},
eps ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and the simple loss
    L_simple = E || eps - eps_theta(x_t, t[, c]) ||^2   (mean over pixels)
With conditional=True the U-Net also gets the class c, replaced by the null class (index
num_classes) with probability p_uncond: one network learns eps(x, c) and eps(x) (Ho & Salimans 2022).

Sampling (EMA weights, samplers.py): sampler=ddpm (ancestral, beta_tilde or beta variance; T steps or a
respaced S) or ddim (S steps, eta); conditional sampling uses eps = (1 + w) eps(x, c) - w eps(x, null)
with w = guidance_scale (w = 0: no guidance).

Test metrics (base.py): test/loss, test/fid, test/sample_confidence; conditional: test/class_accuracy
(samples of class c read as c by the digits classifier, at w = guidance_scale) and
test/class_accuracy_unguided (w = 0). quality_table=true adds the tables of tables.py as artifacts.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from litlab.chapters.diffusion import tables
from litlab.chapters.diffusion.base import DiffusionBase
from litlab.chapters.diffusion.samplers import ClassifierFreeGuidance, DDIMSampler, DDPMSampler
from litlab.chapters.diffusion.schedules import NoiseSchedule
from litlab.chapters.diffusion.unet import UNet
from litlab.errors import ConfigError
from litlab.registry import register_model
from litlab.schema import Range

CHAPTER = "11 Diffusion models"

Side = Annotated[int, Range(ge=1, le=100_000)]
ImageShape = tuple[Side, Side, Side]  # (C, H, W)
NumClasses = Annotated[int, Range(ge=2, le=100_000)]
Channels = Annotated[int, Range(ge=4, le=4096)]
Mults = list[Annotated[int, Range(ge=1, le=64)]]
Steps = Annotated[int, Range(ge=1, le=100_000)]
Unit = Annotated[float, Range(ge=0, lt=1)]
Decay = Annotated[float, Range(ge=0, lt=1)]
Guidance = Annotated[float, Range(ge=0, le=100)]


def build_unet(input_shape, base_channels, channel_mults, num_res_blocks, attention, dropout,
               num_classes=None) -> UNet:
    c, h, w = input_shape
    if base_channels % min(8, base_channels) or any((base_channels * m) % min(8, base_channels * m)
                                                    for m in channel_mults):
        raise ConfigError("model.base_channels", "channels must be divisible by 8 (GroupNorm with 8 groups)")
    if min(h, w) % 2 ** (len(channel_mults) - 1):
        raise ConfigError("model.channel_mults", f"{len(channel_mults)} levels halve a {h}x{w} image "
                          f"{len(channel_mults) - 1} times: H and W must be divisible by {2 ** (len(channel_mults) - 1)}")
    return UNet(c, base_channels, tuple(channel_mults), num_res_blocks, attention, dropout, num_classes)


@register_model(
    "ddpm",
    chapter=CHAPTER,
    description="DDPM (eps-prediction U-Net, linear/cosine schedule) sampled by DDPM or DDIM; "
                "optional classifier-free guidance",
    smoke={"model": {"timesteps": 20, "base_channels": 8, "conditional": True, "sample_steps": 4,
                     "num_eval_samples": 8},
           "data": {"name": "digits", "normalize": False, "batch_size": 16}},
)
class DDPM(DiffusionBase):
    def __init__(
        self,
        input_shape: ImageShape,
        num_classes: NumClasses,
        timesteps: Annotated[int, Range(ge=2, le=100_000)] = 1000,  # T
        schedule: Literal["linear", "cosine"] = "linear",
        base_channels: Channels = 32,
        channel_mults: Mults = [1, 2],  # noqa: B006 (schema default, never mutated)
        num_res_blocks: Annotated[int, Range(ge=1, le=8)] = 1,
        attention: bool = False,  # self-attention at the lowest resolution
        dropout: Unit = 0.0,
        conditional: bool = False,  # class-conditional, trained with label dropout (classifier-free guidance)
        p_uncond: Unit = 0.1,  # probability of replacing the class by the null class in training
        guidance_scale: Guidance = 2.0,  # w: eps = (1 + w) eps(x, c) - w eps(x, null)
        sampler: Literal["ddpm", "ddim"] = "ddim",
        sample_steps: Steps | None = None,  # None: all T (ddpm) / 50 (ddim)
        eta: Annotated[float, Range(ge=0, le=10)] = 0.0,  # DDIM: 0 deterministic, 1 ~ DDPM
        variance: Literal["beta_tilde", "beta"] = "beta_tilde",  # DDPM sampler: posterior or forward variance
        clip_x0: bool = True,  # clip the predicted x_0 to [-1, 1] at every sampling step
        ema_decay: Decay = 0.999,
        sample_every_n_epochs: Annotated[int, Range(ge=1)] = 10,
        num_eval_samples: Annotated[int, Range(ge=2, le=100_000)] = 500,
        sample_seed: Annotated[int, Range(ge=0, lt=2**63)] = 0,
        quality_table: bool = False,  # at test end: FID/confidence against sampling steps (and guidance)
        table_steps: list[Steps] = [10, 20, 50, 100, 1000],  # noqa: B006
        table_samplers: list[Literal["ddim", "ddpm", "ddpm_beta"]] = ["ddim", "ddpm"],  # noqa: B006
        table_guidance: list[Guidance] = [0.0, 0.5, 1.0, 2.0, 4.0],  # noqa: B006
    ):
        super().__init__(ema_decay, sample_every_n_epochs, num_eval_samples, sample_seed)
        self.save_hyperparameters()
        if sample_steps is not None and sample_steps > timesteps:
            raise ConfigError("model.sample_steps", f"{sample_steps} > timesteps={timesteps}")
        self.input_shape = tuple(input_shape)
        self.conditional = conditional
        self.null_class = num_classes
        self.schedule = NoiseSchedule.make(schedule, timesteps)
        self.net = build_unet(input_shape, base_channels, channel_mults, num_res_blocks, attention, dropout,
                              num_classes if conditional else None)
        self.init_ema()

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x, t, y)  # (B, C, H, W), (B,), (B,) -> predicted noise (B, C, H, W)

    def smoke_forward(self, batch) -> Tensor:
        x, y = batch
        t = torch.full((x.shape[0],), self.schedule.num_steps // 2, dtype=torch.long)
        return self(self.schedule.q_sample(x * 2 - 1, t, torch.randn_like(x)), t, y if self.conditional else None)

    # ------------------------------------------------------------ training
    def loss(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b = x.shape[0]
        t = torch.randint(0, self.schedule.num_steps, (b,), device=x.device, generator=generator)  # (B,)
        noise = torch.randn(x.shape, device=x.device, generator=generator)
        xt = self.schedule.q_sample(x, t, noise)  # closed form q(x_t | x_0)
        cond = None
        if self.conditional:
            drop = torch.rand(b, device=x.device, generator=generator) < self.hparams.p_uncond
            cond = torch.where(drop, torch.full_like(y, self.null_class), y)  # label dropout
        return F.mse_loss(self.net(xt, t, cond), noise)  # L_simple

    # ------------------------------------------------------------ sampling
    def make_sampler(self, sampler: str | None = None, steps: int | None = None, eta: float | None = None):
        h = self.hparams
        kind = sampler or h.sampler
        steps = steps or h.sample_steps
        if kind == "ddim":
            return DDIMSampler(self.schedule, min(steps or 50, h.timesteps), h.eta if eta is None else eta, h.clip_x0)
        variance = "beta" if kind == "ddpm_beta" else h.variance if kind == "ddpm" else None
        if variance is None:
            raise ValueError(f"unknown sampler {kind!r}")
        return DDPMSampler(self.schedule, steps, variance, h.clip_x0)

    def default_labels(self, n: int) -> Tensor | None:
        return torch.arange(n, device=self.device) % self.null_class if self.conditional else None

    def sample(self, n: int, labels: Tensor | None = None, generator: torch.Generator | None = None,
               trajectory: list | None = None, sampler: str | None = None, steps: int | None = None,
               eta: float | None = None, guidance: float | None = None) -> Tensor:
        noise = torch.randn((n, *self.input_shape), generator=generator, device=self.device)  # x_T
        if self.conditional:
            if labels is None:  # unconditional samples of the conditional model: the null class, no guidance
                labels, guidance = torch.full((n,), self.null_class, device=self.device), 0.0
            w = self.hparams.guidance_scale if guidance is None else guidance
            eps_fn = ClassifierFreeGuidance(self.net, labels, self.null_class, w)
        else:
            eps_fn = lambda x, t: self.net(x, t)  # noqa: E731
        return self.make_sampler(sampler, steps, eta).sample(eps_fn, noise, generator, trajectory)

    def _quick_options(self) -> dict:
        return {"sampler": "ddim", "steps": min(5, self.hparams.timesteps)} if self._is_fast_dev_run() else {}

    def _progress_options(self) -> dict:
        return {"sampler": "ddim", "steps": min(50, self.hparams.timesteps)}  # grids during training: DDIM-50

    # ------------------------------------------------------------ test
    def extra_test_metrics(self, images: Tensor, labels: Tensor | None, options: dict) -> None:
        if not self.conditional:
            return
        from litlab import quality

        self._log_test("test/class_accuracy", quality.class_accuracy(images, labels))
        unguided = self.generate(len(labels), labels, guidance=0.0, **options)
        self._log_test("test/class_accuracy_unguided", quality.class_accuracy(unguided, labels))

    def quality_tables(self) -> None:
        if self.hparams.quality_table:
            tables.log_quality_tables(self, quick=self._is_fast_dev_run())
