"""Proximal policy optimisation with the clipped surrogate (Schulman et al., 2017).

Each rollout (num_envs x rollout_steps, collected by pi_old) gives GAE(lambda) advantages A_t and
value targets R_t = A_t + V_old(s_t) once; then `update_epochs` passes over it in `num_minibatches`
shuffled minibatches, one optimiser step each (so each rollout is update_epochs x num_minibatches
training batches). Per minibatch, with r_t = pi(a_t|s_t) / pi_old(a_t|s_t):

    L_clip = mean_t min( r_t * A_t,  clip(r_t, 1 - eps, 1 + eps) * A_t )      (maximised)
    loss   = -L_clip + value_coef * mean_t 0.5 (V(s_t) - R_t)^2 - entropy_coef * mean_t H[pi(.|s_t)]

The min makes the objective a pessimistic bound: once r_t left [1 - eps, 1 + eps] in the direction
the advantage favours, the sample gives no more gradient. Advantages are normalised per minibatch
(`normalize_advantages`); `clip_value_loss` also clips V(s) to V_old(s) +- eps in the value loss.
Logged: train/approx_kl = mean((r - 1) - log r) (Schulman's low-variance KL(pi_old || pi) estimator)
and train/clip_fraction (the share of samples whose ratio was clipped).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from litlab.chapters.rl.module import CHAPTER
from litlab.chapters.rl.policy_gradient import (
    SMOKE_DATA,
    Coef,
    Gamma,
    LogStd,
    OnPolicyModule,
    Width,
)
from litlab.chapters.rl.returns import bootstrap_truncations, gae, normalize
from litlab.errors import ConfigError
from litlab.registry import register_model
from litlab.schema import Range


def ppo_clip_objective(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                       clip_eps: float) -> torch.Tensor:
    """L_clip: mean over the batch of min(r A, clip(r, 1-eps, 1+eps) A). (B,) x3 -> scalar."""
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return torch.minimum(unclipped, clipped).mean()


@register_model(
    "ppo",
    chapter=CHAPTER,
    description="PPO: clipped surrogate, GAE(lambda), value loss, entropy bonus, epochs of minibatches per rollout",
    smoke={"model": {"hidden": [16], "update_epochs": 2, "num_minibatches": 2}, "data": SMOKE_DATA},
)
class PPO(OnPolicyModule):
    def __init__(
        self,
        obs_dim: Annotated[int, Range(ge=1)],
        action_dim: Annotated[int, Range(ge=1)],
        continuous: bool,
        hidden: list[Width] = [64, 64],  # noqa: B006
        activation: Literal["tanh", "relu"] = "tanh",
        gamma: Gamma = 0.99,
        gae_lambda: Annotated[float, Range(ge=0, le=1)] = 0.95,
        clip_eps: Annotated[float, Range(gt=0, lt=1)] = 0.2,
        update_epochs: Annotated[int, Range(ge=1, le=1_000)] = 4,
        num_minibatches: Annotated[int, Range(ge=1, le=100_000)] = 4,
        value_coef: Coef = 0.5,
        entropy_coef: Coef = 0.01,
        normalize_advantages: bool = True,
        clip_value_loss: bool = False,
        init_log_std: LogStd = 0.0,
    ):
        super().__init__(obs_dim, action_dim, continuous, hidden, activation, gamma, value_coef, entropy_coef,
                         normalize_advantages, init_log_std)
        self.save_hyperparameters()
        self.gae_lambda, self.clip_eps, self.clip_value_loss = gae_lambda, clip_eps, clip_value_loss
        self.update_epochs, self.num_minibatches = update_epochs, num_minibatches
        self.batches_per_rollout = update_epochs * num_minibatches

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule
        size = getattr(dm, "rollout_steps", 0) * getattr(dm, "num_envs", 0)
        if size and size < self.num_minibatches:
            raise ConfigError("model.num_minibatches", f"{self.num_minibatches} minibatches from rollouts of only "
                              f"{size} steps (data.num_envs x data.rollout_steps): use at most {size}")

    def estimate(self, rollout):
        rewards = bootstrap_truncations(rollout.rewards, rollout.truncation_values, self.gamma)
        adv, returns = gae(rewards, rollout.values, rollout.dones, rollout.last_value, self.gamma, self.gae_lambda)
        return adv, returns, torch.ones_like(adv)

    def rollout_batches(self, rollout):
        adv, returns, mask = self.estimate(rollout)
        samples = rollout.flat(advantages=adv, returns=returns, mask=mask)  # (T*N, ...)
        size = adv.numel()
        for _ in range(self.update_epochs):
            for idx in torch.randperm(size).tensor_split(self.num_minibatches):
                yield {k: v[idx] for k, v in samples.items()}

    def training_step(self, batch, batch_idx):
        dist = self.net.distribution(batch["obs"])
        log_prob = dist.log_prob(batch["actions"])  # (B,)
        adv = batch["advantages"]
        if self.normalize_advantages and adv.numel() > 1:  # a one-sample minibatch has no spread
            adv = normalize(adv)
        policy_loss = -ppo_clip_objective(log_prob, batch["log_probs"], adv, self.clip_eps)

        value = self.net.value(batch["obs"])  # (B,)
        value_error = (value - batch["returns"]) ** 2
        if self.clip_value_loss:
            clipped = batch["values"] + (value - batch["values"]).clamp(-self.clip_eps, self.clip_eps)
            value_error = torch.maximum(value_error, (clipped - batch["returns"]) ** 2)
        value_loss = 0.5 * value_error.mean()
        entropy = dist.entropy().mean()
        loss = policy_loss + self.value_coef * value_loss - self.entropy_coef * entropy

        with torch.no_grad():
            log_ratio = log_prob - batch["log_probs"]
            approx_kl = (log_ratio.exp() - 1 - log_ratio).mean()
            clip_fraction = ((log_ratio.exp() - 1).abs() > self.clip_eps).float().mean()
        b = adv.shape[0]
        self.log("train/approx_kl", approx_kl, on_step=False, on_epoch=True, batch_size=b)
        self.log("train/clip_fraction", clip_fraction, on_step=False, on_epoch=True, batch_size=b)
        self._log_losses(loss, policy_loss, value_loss, entropy, batch)
        return loss

