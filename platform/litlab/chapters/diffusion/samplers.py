"""Samplers: objects apart from the networks. Each takes a function of the network, the initial
noise and an optional torch.Generator, and returns the sample (and, if asked, its trajectory).

    eps_fn(x (B, C, H, W), t (B,) long original time indices) -> predicted noise (B, C, H, W)
    score_fn(x, level (B,) long noise-level indices)          -> score grad_x log p_sigma(x)

* DDPMSampler: ancestral sampling, x_{t-1} = mu_tilde(x_t, x0_hat) + sqrt(var) z with var = beta_tilde_t
  (posterior variance) or beta_t (Ho et al. found both work), on all T steps or a respaced
  subsequence of S steps (Nichol & Dhariwal).
* DDIMSampler (Song, Meng & Ermon 2021): on a subsequence tau of S steps,
      x_{tau_{i-1}} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
      sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev);
  eta = 0 is deterministic (no z drawn at all), eta = 1 is the DDPM posterior on the subsequence.
* ClassifierFreeGuidance (Ho & Salimans 2022) wraps a conditional network into an eps_fn.
  Convention: eps = (1 + w) eps(x, c) - w eps(x, null); w = 0 is the plain conditional model.
* AnnealedLangevin (Song & Ermon 2019): for each sigma_i (largest first), n steps of
      x <- x + (alpha_i / 2) s(x, sigma_i) + sqrt(alpha_i) z,   alpha_i = step_lr sigma_i^2 / sigma_L^2,
  then optionally one denoising step x <- x + sigma_L^2 s(x, sigma_L) (Tweedie; Jolicoeur-Martineau et al. 2021).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from litlab.chapters.diffusion.schedules import GeometricSigmas, NoiseSchedule

EpsFn = Callable[[Tensor, Tensor], Tensor]
ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _full(t: int | Tensor, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)


class DDPMSampler:
    """Ancestral sampling on the full schedule (num_steps=None or T) or a respaced one."""

    def __init__(self, schedule: NoiseSchedule, num_steps: int | None = None,
                 variance: Literal["beta_tilde", "beta"] = "beta_tilde", clip_x0: bool = True):
        if variance not in ("beta_tilde", "beta"):
            raise ValueError("variance: beta_tilde or beta")
        self.full = schedule
        self.schedule = schedule if num_steps in (None, len(schedule)) else schedule.respace(num_steps)
        self.variance, self.clip_x0 = variance, clip_x0

    def __repr__(self) -> str:
        return f"DDPMSampler(steps={len(self.schedule)}, variance={self.variance})"

    @torch.no_grad()
    def sample(self, eps_fn: EpsFn, noise: Tensor, generator: torch.Generator | None = None,
               trajectory: list | None = None) -> Tensor:
        s = self.schedule
        x = noise  # x_T ~ N(0, I)
        if trajectory is not None:
            trajectory.append((len(self.full), x.cpu()))
        for i in reversed(range(len(s))):
            idx = _full(i, x)  # position in the (respaced) schedule
            eps = eps_fn(x, _full(s.timesteps[i], x))
            x0 = s.predict_x0(x, idx, eps)
            if self.clip_x0:
                x0 = x0.clamp(-1, 1)
            mean, post_var = s.posterior(x0, x, idx)
            if i > 0:
                var = post_var if self.variance == "beta_tilde" else s.betas[i].to(x.dtype)
                x = mean + var.sqrt() * _randn_like(x, generator)
            else:
                x = mean  # the last step adds no noise (beta_tilde_0 = 0)
            if trajectory is not None:
                trajectory.append((int(s.timesteps[i]), x.cpu()))
        return x


class DDIMSampler:
    """DDIM on `num_steps` evenly spaced steps of the training schedule, stochasticity eta."""

    def __init__(self, schedule: NoiseSchedule, num_steps: int, eta: float = 0.0, clip_x0: bool = True):
        if eta < 0:
            raise ValueError("eta must be >= 0")
        self.full = schedule
        self.schedule = schedule.respace(num_steps)  # keeps abar at the kept steps: what DDIM needs
        self.eta, self.clip_x0 = eta, clip_x0

    def __repr__(self) -> str:
        return f"DDIMSampler(steps={len(self.schedule)}, eta={self.eta})"

    @torch.no_grad()
    def sample(self, eps_fn: EpsFn, noise: Tensor, generator: torch.Generator | None = None,
               trajectory: list | None = None) -> Tensor:
        s = self.schedule
        x = noise
        if trajectory is not None:
            trajectory.append((len(self.full), x.cpu()))
        for i in reversed(range(len(s))):
            abar = s.alpha_bars[i].item()
            abar_prev = s.alpha_bars_prev[i].item()  # 1 at the last step: x_{-1} is the data
            eps = eps_fn(x, _full(s.timesteps[i], x))
            x0 = (x - (1 - abar) ** 0.5 * eps) / abar ** 0.5
            if self.clip_x0:
                x0 = x0.clamp(-1, 1)
                eps = (x - abar ** 0.5 * x0) / (1 - abar) ** 0.5  # the eps consistent with the clipped x0
            sigma = self.eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
            x = abar_prev ** 0.5 * x0 + max(1 - abar_prev - sigma ** 2, 0.0) ** 0.5 * eps
            if sigma > 0:
                x = x + sigma * _randn_like(x, generator)
            if trajectory is not None:
                trajectory.append((int(s.timesteps[i]), x.cpu()))
        return x


class ClassifierFreeGuidance:
    """eps_fn for net(x, t, y) with guidance scale w: (1 + w) eps(x, t, y) - w eps(x, t, null).
    One batched call of 2B when w != 0; `labels` (B,) are the asked classes."""

    def __init__(self, net: Callable[[Tensor, Tensor, Tensor], Tensor], labels: Tensor, null_class: int,
                 scale: float):
        self.net, self.labels, self.null_class, self.scale = net, labels, null_class, scale

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        y = self.labels.to(x.device)
        if self.scale == 0:
            return self.net(x, t, y)
        null = torch.full_like(y, self.null_class)
        eps_c, eps_u = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return (1 + self.scale) * eps_c - self.scale * eps_u


class AnnealedLangevin:
    """Annealed Langevin dynamics over the NCSN noise levels (largest sigma first)."""

    def __init__(self, sigmas: GeometricSigmas | Tensor, steps_per_level: int = 20, step_lr: float = 2e-5,
                 denoise_final: bool = True):
        self.sigmas = sigmas.sigmas if isinstance(sigmas, GeometricSigmas) else torch.as_tensor(sigmas)
        self.steps_per_level, self.step_lr, self.denoise_final = steps_per_level, step_lr, denoise_final

    def __repr__(self) -> str:
        return (f"AnnealedLangevin(levels={len(self.sigmas)}, steps_per_level={self.steps_per_level}, "
                f"step_lr={self.step_lr:g})")

    @torch.no_grad()
    def sample(self, score_fn: ScoreFn, init: Tensor, generator: torch.Generator | None = None,
               trajectory: list | None = None) -> Tensor:
        x = init
        if trajectory is not None:  # (level index: -1 = init, L = after the denoising step, x)
            trajectory.append((-1, x.cpu()))
        sigma_last = float(self.sigmas[-1])
        for i, sigma in enumerate(self.sigmas.tolist()):
            alpha = self.step_lr * (sigma / sigma_last) ** 2  # step size ~ sigma_i^2: same signal-to-noise per level
            level = _full(i, x)
            for _ in range(self.steps_per_level):
                x = x + 0.5 * alpha * score_fn(x, level) + alpha ** 0.5 * _randn_like(x, generator)
            if trajectory is not None:
                trajectory.append((i, x.cpu()))
        if self.denoise_final:
            x = x + sigma_last ** 2 * score_fn(x, _full(len(self.sigmas) - 1, x))  # E[x_0 | x] (Tweedie)
            if trajectory is not None:
                trajectory.append((len(self.sigmas), x.cpu()))
        return x
