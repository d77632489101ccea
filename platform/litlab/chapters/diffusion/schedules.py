"""Noise schedules of DDPM (Ho et al. 2020) and NCSN (Song & Ermon 2019), objects apart from the networks.

Time is a 0-based index t = 0..T-1 (the paper's t = 1..T shifted by one): beta[t] is the variance
added by the step x_{t-1} -> x_t, and x_{-1} is the data x_0 (abar_{-1} = 1).

    alpha_t = 1 - beta_t,  abar_t = prod_{s<=t} alpha_s
    q(x_t | x_0)          = N(sqrt(abar_t) x_0, (1 - abar_t) I)                     (closed form)
    q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde_t I)                              (posterior)
        mu_tilde     = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t

`NoiseSchedule.respace(timesteps)` keeps the abar of a subsequence of the steps and recomputes the
betas between them (beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}}): the strided DDPM sampler of
Nichol & Dhariwal 2021, which the samplers use for DDPM with fewer than T steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al.: beta linear from 1e-4 to 0.02 at T = 1000; for other T the end points scale by
    1000 / T so that abar_T (how much signal is left) stays about the same (as in improved-DDPM);
    clipped at 0.999 for very short schedules (T < 50)."""
    scale = 1000.0 / num_steps
    return torch.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=torch.float64).clamp(max=0.999)


def cosine_alpha_bar(u: Tensor | float, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal's f(u) / f(0), f(u) = cos^2(pi/2 (u + s) / (1 + s)), u = t / T in [0, 1]."""
    u = torch.as_tensor(u, dtype=torch.float64)
    f = lambda v: torch.cos((v + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(u) / f(torch.zeros((), dtype=torch.float64))


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """beta_t = 1 - abar(t+1) / abar(t) from the closed form (0-based t: abar_t = f((t+1)/T) / f(0)),
    clipped at max_beta to avoid the singularity at u = 1 (only the last step or two are clipped)."""
    u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    abar = cosine_alpha_bar(u, s)
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def _gather(v: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """v[t] for a batch of indices t (B,), reshaped (B, 1, 1, ...) to broadcast against `like`."""
    out = v.to(like.dtype).to(like.device)[t.to(like.device)]
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """A DDPM schedule: betas (T,) and everything derived from them, as float64 tensors (cast to the
    data's dtype on use). `timesteps` (T,) are the original time indices of each step (arange(T) for a
    full schedule, a subsequence after `respace`), i.e. what the network is conditioned on."""

    def __init__(self, betas: Tensor, timesteps: Tensor | None = None, name: str = "custom"):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        self.name = name
        self.betas = betas
        self.num_steps = len(betas)
        self.timesteps = torch.arange(self.num_steps) if timesteps is None else torch.as_tensor(timesteps).long()
        self.alphas = 1 - betas
        self.alpha_bars = torch.cumprod(self.alphas, 0)  # abar_t = prod_{s<=t} (1 - beta_s)
        self.alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])  # abar_{t-1}
        # posterior q(x_{t-1} | x_t, x_0): variance and the two mean coefficients
        self.posterior_variance = betas * (1 - self.alpha_bars_prev) / (1 - self.alpha_bars)  # beta_tilde_t
        self.posterior_coef_x0 = self.alpha_bars_prev.sqrt() * betas / (1 - self.alpha_bars)
        self.posterior_coef_xt = self.alphas.sqrt() * (1 - self.alpha_bars_prev) / (1 - self.alpha_bars)

    @classmethod
    def make(cls, kind: str, num_steps: int) -> "NoiseSchedule":
        if kind == "linear":
            return cls(linear_betas(num_steps), name="linear")
        if kind == "cosine":
            return cls(cosine_betas(num_steps), name="cosine")
        raise ValueError(f"unknown schedule {kind!r}: linear or cosine")

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.name}, T={self.num_steps}, abar_T={self.alpha_bars[-1].item():.2e})"

    # ------------------------------------------------------------ forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: a sample of q(x_t | x_0); t (B,) step indices."""
        ab = _gather(self.alpha_bars, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def predict_x0(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert the closed form: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        ab = _gather(self.alpha_bars, t, xt)
        return (xt - (1 - ab).sqrt() * eps) / ab.sqrt()

    def eps_from_x0(self, xt: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        ab = _gather(self.alpha_bars, t, xt)
        return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()

    # ------------------------------------------------------------ reverse process
    def posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (B, ...) and variance (B, 1, ...) of q(x_{t-1} | x_t, x_0)."""
        mean = _gather(self.posterior_coef_x0, t, xt) * x0 + _gather(self.posterior_coef_xt, t, xt) * xt
        return mean, _gather(self.posterior_variance, t, xt)

    def respace(self, num_steps: int) -> "NoiseSchedule":
        """The schedule on `num_steps` evenly spaced steps of this one (always including the last),
        with the same abar at the kept steps; timesteps keep the original indices."""
        keep = spaced_timesteps(self.num_steps, num_steps)
        abar = self.alpha_bars[keep]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return NoiseSchedule(1 - abar / abar_prev, timesteps=self.timesteps[keep], name=f"{self.name}/{num_steps}")


def spaced_timesteps(total: int, num_steps: int) -> Tensor:
    """`num_steps` increasing indices out of 0..total-1, evenly spaced, first 0 and last total-1
    (num_steps = total: every step)."""
    if not 1 <= num_steps <= total:
        raise ValueError(f"num_steps must be in 1..{total}, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([total - 1])
    idx = torch.round(torch.linspace(0, total - 1, num_steps, dtype=torch.float64)).long()
    return torch.unique(idx)  # sorted; unique guards rounding collisions (cannot happen for num_steps <= total)


class GeometricSigmas:
    """NCSN noise levels: sigma_1 > ... > sigma_L, a geometric sequence (constant ratio), from
    sigma_max down to sigma_min. `index` i of a sample means sigma_i."""

    def __init__(self, sigma_max: float, sigma_min: float, num_levels: int):
        if not sigma_max > sigma_min > 0 or num_levels < 2:
            raise ValueError("need sigma_max > sigma_min > 0 and at least 2 levels")
        self.sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_levels,
                                               dtype=torch.float64))
        self.num_levels = num_levels

    def __len__(self) -> int:
        return self.num_levels

    def __getitem__(self, i):
        return self.sigmas[i]

    @property
    def ratio(self) -> float:
        return float(self.sigmas[1] / self.sigmas[0])
