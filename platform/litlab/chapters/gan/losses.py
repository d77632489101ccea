"""GAN objectives, as functions of the discriminator's outputs (logits or critic scores).

Standard GAN (Goodfellow et al. 2014), D(x) = sigmoid(l(x)):
    D:  max  E log D(x) + E log(1 - D(G(z)))       = min BCE(l(x), 1) + BCE(l(G(z)), 0)
    G minimax:         min  E log(1 - D(G(z)))    = E[-softplus(l)]      (gradient vanishes when D wins)
    G non-saturating:  min -E log D(G(z))         = E[softplus(-l)]      (strong gradient when D wins)
WGAN (Arjovsky et al. 2017), critic f (no sigmoid), W(P_r, P_g) ~ max_{||f||_L <= 1} E f(x) - E f(G(z)):
    critic: min E f(G(z)) - E f(x);  G: min -E f(G(z))
    Lipschitz constraint by weight clipping to [-c, c] (`clip_weights`) or by the gradient penalty
    (WGAN-GP, Gulrajani et al. 2017): lambda * E_{x^ = e x + (1-e) G(z), e ~ U[0,1]} (||grad f(x^)||_2 - 1)^2
LSGAN (Mao et al. 2017), used by CycleGAN: D: 1/2 E (D(x) - 1)^2 + 1/2 E D(G(z))^2;  G: E (D(G(z)) - 1)^2
CycleGAN cycle consistency (Zhu et al. 2017): E |F(G(a)) - a|_1 + E |G(F(b)) - b|_1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AdvLoss = Literal["bce", "lsgan"]


# ---------------------------------------------------------------- standard GAN (logits)
def d_loss_bce(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """-E log D(x) - E log(1 - D(G(z))), on logits (numerically stable)."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss_nonsaturating(fake_logits: Tensor) -> Tensor:
    """-E log D(G(z)) = E softplus(-l)."""
    return F.softplus(-fake_logits).mean()


def g_loss_minimax(fake_logits: Tensor) -> Tensor:
    """E log(1 - D(G(z))) = E[-softplus(l)] (the original minimax objective, saturating)."""
    return (-F.softplus(fake_logits)).mean()


def d_accuracy(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Fraction of real (logit > 0) and fake (logit < 0) judged correctly: 0.5 at D's equilibrium."""
    return torch.cat([(real_logits > 0).float().flatten(), (fake_logits < 0).float().flatten()]).mean()


# ---------------------------------------------------------------- WGAN (critic scores)
def critic_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """E f(G(z)) - E f(x): minus the critic's estimate of the Wasserstein-1 distance."""
    return fake_scores.mean() - real_scores.mean()


def g_loss_wasserstein(fake_scores: Tensor) -> Tensor:
    return -fake_scores.mean()


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, weight: float = 10.0,
                     eps: Tensor | None = None) -> Tensor:
    """lambda * E (||grad_x f(x^)||_2 - 1)^2 on x^ = eps x + (1 - eps) x~, eps ~ U[0, 1] per sample.

    The graph is kept (create_graph=True) so that the penalty's own gradient reaches the critic's
    weights. `eps` (B,) may be given (tests)."""
    b = real.shape[0]
    if eps is None:
        eps = torch.rand(b, device=real.device, dtype=real.dtype)
    eps = eps.view(b, *([1] * (real.dim() - 1)))
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)  # (B, ...)
    scores = critic(x_hat)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)  # per-sample grads: f is per sample
    return weight * ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


@torch.no_grad()
def clip_weights(module: nn.Module, c: float) -> None:
    """w <- clamp(w, -c, c) for every parameter (the original WGAN's crude Lipschitz bound)."""
    for p in module.parameters():
        p.clamp_(-c, c)


# ---------------------------------------------------------------- LSGAN / either, for image-to-image
def d_loss_lsgan(real_out: Tensor, fake_out: Tensor) -> Tensor:
    return 0.5 * ((real_out - 1) ** 2).mean() + 0.5 * (fake_out**2).mean()


def g_loss_lsgan(fake_out: Tensor) -> Tensor:
    return ((fake_out - 1) ** 2).mean()


def adversarial_d_loss(kind: AdvLoss, real_out: Tensor, fake_out: Tensor) -> Tensor:
    """D's loss for `kind`; "bce" is halved as in pix2pix (D learns at half G's pace)."""
    return 0.5 * d_loss_bce(real_out, fake_out) if kind == "bce" else d_loss_lsgan(real_out, fake_out)


def adversarial_g_loss(kind: AdvLoss, fake_out: Tensor) -> Tensor:
    return g_loss_nonsaturating(fake_out) if kind == "bce" else g_loss_lsgan(fake_out)


def cycle_loss(x: Tensor, reconstruction: Tensor) -> Tensor:
    """E |x - F(G(x))|_1 (mean over pixels)."""
    return (x - reconstruction).abs().mean()
