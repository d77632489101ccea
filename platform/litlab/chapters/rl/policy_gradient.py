"""Policy-gradient methods on on-policy rollouts: REINFORCE with a learned baseline, and advantage
actor-critic (A2C). Both take one gradient step per rollout (data.name=gym_rollout).

Policy gradient theorem: grad J = E[ grad log pi(a_t|s_t) * A_t ], estimated on the rollout with

    loss = - mean_t( log pi(a_t|s_t) * A_t )                    (A_t a constant: the policy term)
           + value_coef * mean_t( 0.5 * (V(s_t) - R_t)^2 )      (the critic / baseline regression)
           - entropy_coef * mean_t( H[pi(.|s_t)] )              (an entropy bonus keeps exploring)

REINFORCE: R_t = G_t, the Monte-Carlo discounted return-to-go of the episode, and A_t = G_t - V(s_t)
(a baseline lowers the variance without bias). G_t needs the episode's end, so the steps of an
episode the rollout cuts off (its tail) get mask 0 and no gradient; a time limit counts as the end.
A2C: bootstraps from the critic. advantage=nstep: A_t = (r_t + ... + gamma^(n-1) r_{t+n-1} +
gamma^n V(s_{t+n})) - V(s_t), n = the steps to the rollout's end (A3C); advantage=gae:
GAE(lambda) (returns.py). Time-limit ends bootstrap with V(s_final).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

import torch

from litlab.chapters.rl.buffers import RolloutStorage
from litlab.chapters.rl.module import CHAPTER, RLModule
from litlab.chapters.rl.nets import ActorCritic
from litlab.chapters.rl.returns import (
    bootstrap_truncations,
    complete_episode_mask,
    discounted_returns,
    gae,
    normalize,
)
from litlab.registry import register_model
from litlab.schema import Range

Width = Annotated[int, Range(ge=1, le=65_536)]
Gamma = Annotated[float, Range(ge=0, le=1)]
Coef = Annotated[float, Range(ge=0, le=1_000)]
LogStd = Annotated[float, Range(ge=-20, le=5)]

SMOKE_DATA = {"name": "gym_rollout", "env_id": "CartPole-v1", "num_envs": 2, "rollout_steps": 16,
              "rollouts_per_epoch": 1, "eval_episodes": 1, "gif_max_frames": 0}


class OnPolicyModule(RLModule):
    """An ActorCritic trained on rollouts; subclasses define `estimate()` (and PPO the loss)."""

    interaction = "rollout"
    batches_per_rollout = 1

    def __init__(self, obs_dim: int, action_dim: int, continuous: bool, hidden: list[int], activation: str,
                 gamma: float, value_coef: float, entropy_coef: float, normalize_advantages: bool,
                 init_log_std: float):
        super().__init__()
        self.net = ActorCritic(obs_dim, action_dim, continuous, hidden, activation, init_log_std)
        self.gamma, self.value_coef, self.entropy_coef = gamma, value_coef, entropy_coef
        self.normalize_advantages = normalize_advantages

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)  # (B, D) -> logits or Gaussian means (B, A)

    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net.greedy(obs)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net.value(obs)

    def explore(self, obs: torch.Tensor, env_steps: int) -> dict[str, torch.Tensor]:
        """a ~ pi(.|s), with log pi(a|s) and V(s) for the learner."""
        dist = self.net.distribution(obs)
        action = dist.sample()
        return {"action": action, "log_prob": dist.log_prob(action), "value": self.net.value(obs)}

    def estimate(self, rollout: RolloutStorage) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(advantages, value targets, mask), each (T, N)."""
        raise NotImplementedError

    def rollout_batches(self, rollout: RolloutStorage) -> Iterator[dict[str, torch.Tensor]]:
        adv, ret, mask = self.estimate(rollout)
        yield rollout.flat(advantages=adv, returns=ret, mask=mask)  # the whole rollout: one step

    def training_step(self, batch, batch_idx):
        dist = self.net.distribution(batch["obs"])
        log_prob = dist.log_prob(batch["actions"])  # (B,)
        mask = batch["mask"]
        n = mask.sum().clamp(min=1.0)
        adv = normalize(batch["advantages"], mask) if self.normalize_advantages else batch["advantages"]
        policy_loss = -(log_prob * adv * mask).sum() / n
        value_loss = (0.5 * (self.net.value(batch["obs"]) - batch["returns"]) ** 2 * mask).sum() / n
        entropy = (dist.entropy() * mask).sum() / n
        loss = policy_loss + self.value_coef * value_loss - self.entropy_coef * entropy
        self._log_losses(loss, policy_loss, value_loss, entropy, batch)
        return loss

    def _log_losses(self, loss, policy_loss, value_loss, entropy, batch) -> None:
        b = batch["obs"].shape[0]
        for name, value in (("loss", loss), ("policy_loss", policy_loss), ("value_loss", value_loss),
                            ("entropy", entropy)):
            self.log(f"train/{name}", value.detach(), on_step=name == "loss", on_epoch=True, batch_size=b)
        self.log_episodes(batch)


@register_model(
    "reinforce",
    chapter=CHAPTER,
    description="REINFORCE: Monte-Carlo policy gradient with a learned value baseline (discrete or Gaussian)",
    # rollouts long enough for episodes to end inside them (REINFORCE learns only from ended ones)
    smoke={"model": {"hidden": [16]}, "data": {**SMOKE_DATA, "rollout_steps": 64}},
)
class Reinforce(OnPolicyModule):
    def __init__(
        self,
        obs_dim: Annotated[int, Range(ge=1)],
        action_dim: Annotated[int, Range(ge=1)],
        continuous: bool,
        hidden: list[Width] = [64, 64],  # noqa: B006
        activation: Literal["tanh", "relu"] = "tanh",
        gamma: Gamma = 0.99,
        value_coef: Coef = 0.5,
        entropy_coef: Coef = 0.0,
        normalize_advantages: bool = False,
        init_log_std: LogStd = 0.0,  # continuous actions: log sigma at the start
    ):
        super().__init__(obs_dim, action_dim, continuous, hidden, activation, gamma, value_coef, entropy_coef,
                         normalize_advantages, init_log_std)
        self.save_hyperparameters()

    def estimate(self, rollout):
        returns = discounted_returns(rollout.rewards, rollout.dones, self.gamma, 0.0)  # G_t, no bootstrap
        mask = complete_episode_mask(rollout.dones)  # G_t is known only where the episode ended in the rollout
        return (returns - rollout.values) * mask, returns * mask, mask


@register_model(
    "a2c",
    chapter=CHAPTER,
    description="Advantage actor-critic (synchronous A3C): n-step or GAE advantages, entropy bonus",
    smoke={"model": {"hidden": [16]}, "data": SMOKE_DATA},
)
class A2C(OnPolicyModule):
    def __init__(
        self,
        obs_dim: Annotated[int, Range(ge=1)],
        action_dim: Annotated[int, Range(ge=1)],
        continuous: bool,
        hidden: list[Width] = [64, 64],  # noqa: B006
        activation: Literal["tanh", "relu"] = "tanh",
        gamma: Gamma = 0.99,
        advantage: Literal["nstep", "gae"] = "nstep",
        gae_lambda: Annotated[float, Range(ge=0, le=1)] = 0.95,
        value_coef: Coef = 0.5,
        entropy_coef: Coef = 0.01,
        normalize_advantages: bool = False,
        init_log_std: LogStd = 0.0,
    ):
        super().__init__(obs_dim, action_dim, continuous, hidden, activation, gamma, value_coef, entropy_coef,
                         normalize_advantages, init_log_std)
        self.save_hyperparameters()
        self.advantage, self.gae_lambda = advantage, gae_lambda

    def estimate(self, rollout):
        rewards = bootstrap_truncations(rollout.rewards, rollout.truncation_values, self.gamma)
        if self.advantage == "gae":
            adv, returns = gae(rewards, rollout.values, rollout.dones, rollout.last_value, self.gamma, self.gae_lambda)
        else:  # n-step: bootstrapped discounted return to the end of the rollout
            returns = discounted_returns(rewards, rollout.dones, self.gamma, rollout.last_value)
            adv = returns - rollout.values
        return adv, returns, torch.ones_like(adv)
