"""Deep Q-learning (Mnih et al., 2015) with experience replay, a target network, epsilon-greedy
exploration on a decaying schedule, the Huber loss, and double DQN (van Hasselt et al., 2016).

For a batch of transitions (s, a, r, s', terminated) from the replay buffer:

    DQN target:         y = r + gamma * (1 - terminated) * max_a' Q_target(s', a')
    double DQN target:  y = r + gamma * (1 - terminated) * Q_target(s', argmax_a' Q_online(s', a'))
    loss = mean Huber_delta(Q_online(s, a) - y)          (y is a constant: no gradient through it)

The target network is a frozen copy of the online one: `target_update=hard` copies the weights
every `target_update_every` optimiser steps; `polyak` moves them a little every step,
theta_target <- (1 - tau) theta_target + tau theta_online. A truncated (time-limit) transition
is not terminal: it still bootstraps from s' (the buffer stores the true next state).
"""

from __future__ import annotations

import copy
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from litlab.chapters.rl.module import CHAPTER, RLModule
from litlab.chapters.rl.nets import QNetwork
from litlab.chapters.rl.schedules import make_schedule
from litlab.errors import ConfigError
from litlab.registry import register_model
from litlab.schema import Range

Width = Annotated[int, Range(ge=1, le=65_536)]
Gamma = Annotated[float, Range(ge=0, le=1)]


@register_model(
    "dqn",
    chapter=CHAPTER,
    description="Deep Q-network: replay buffer, target network, epsilon-greedy, Huber loss, optional double DQN",
    smoke={"model": {"hidden": [16], "eps_decay_steps": 50, "target_update_every": 2},
           "data": {"name": "gym_replay", "env_id": "CartPole-v1", "buffer_size": 64, "warmup_steps": 32,
                    "batch_size": 16, "updates_per_epoch": 2, "eval_episodes": 1, "gif_max_frames": 0}},
)
class DQN(RLModule):
    interaction = "replay"

    def __init__(
        self,
        obs_dim: Annotated[int, Range(ge=1)],
        action_dim: Annotated[int, Range(ge=1)],
        continuous: bool,
        hidden: list[Width] = [128, 128],  # noqa: B006 (the config schema's default)
        activation: Literal["relu", "tanh"] = "relu",
        gamma: Gamma = 0.99,
        double: bool = True,
        huber_delta: Annotated[float, Range(gt=0)] = 1.0,
        target_update: Literal["hard", "polyak"] = "hard",
        target_update_every: Annotated[int, Range(ge=1)] = 500,  # optimiser steps between hard copies
        tau: Annotated[float, Range(gt=0, le=1)] = 0.005,  # polyak rate
        eps_start: Annotated[float, Range(ge=0, le=1)] = 1.0,
        eps_end: Annotated[float, Range(ge=0, le=1)] = 0.05,
        eps_decay_steps: Annotated[int, Range(ge=0)] = 10_000,  # env steps (linear: to eps_end; exp: time constant)
        eps_schedule: Literal["linear", "exponential"] = "linear",
    ):
        super().__init__()
        if continuous:
            raise ConfigError("data.env_id", "dqn needs a discrete action space (argmax over actions); this env's "
                              "actions are continuous: use model.name=ppo, a2c or reinforce")
        self.save_hyperparameters()
        self.gamma, self.double, self.huber_delta = gamma, double, huber_delta
        self.target_update, self.target_update_every, self.tau = target_update, target_update_every, tau
        self.q_net = QNetwork(obs_dim, action_dim, hidden, activation)
        self.target_net = copy.deepcopy(self.q_net).requires_grad_(False)  # in the state_dict, not optimised
        self.epsilon = make_schedule(eps_schedule, eps_start, eps_end, eps_decay_steps)
        self.num_actions = action_dim
        self.current_epsilon = eps_start

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q_net(obs)  # (B, D) -> Q (B, A)

    # -- policies -----------------------------------------------------------------------------
    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q_net(obs).argmax(-1)  # (B,)

    def explore(self, obs: torch.Tensor, env_steps: int) -> dict[str, torch.Tensor]:
        """epsilon-greedy: a uniformly random action with probability epsilon(env_steps)."""
        eps = self.epsilon(env_steps)
        self.current_epsilon = eps
        n = obs.shape[0]
        random_actions = torch.randint(0, self.num_actions, (n,), device=obs.device)
        explore = torch.rand(n, device=obs.device) < eps
        return {"action": torch.where(explore, random_actions, self.greedy(obs))}

    # -- learning -----------------------------------------------------------------------------
    def td_target(self, rewards, next_obs, terminated) -> torch.Tensor:
        with torch.no_grad():
            next_q_target = self.target_net(next_obs)  # (B, A)
            if self.double:  # the online net picks a', the target net evaluates it
                next_actions = self.q_net(next_obs).argmax(-1, keepdim=True)  # (B, 1)
                next_value = next_q_target.gather(1, next_actions).squeeze(1)
            else:
                next_value = next_q_target.max(-1).values
            return rewards + self.gamma * (1.0 - terminated) * next_value  # (B,)

    def training_step(self, batch, batch_idx):
        q = self.q_net(batch["obs"]).gather(1, batch["actions"].long().unsqueeze(1)).squeeze(1)  # Q(s, a) (B,)
        target = self.td_target(batch["rewards"], batch["next_obs"], batch["terminated"])
        loss = F.huber_loss(q, target, delta=self.huber_delta)
        b = q.shape[0]
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, batch_size=b)
        self.log("train/q_mean", q.detach().mean(), on_step=False, on_epoch=True, batch_size=b)
        self.log("train/epsilon", float(self.current_epsilon), on_step=True, on_epoch=False, batch_size=b)
        self.log_episodes(batch)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # global_step already counts the optimiser step just taken
        if self.target_update == "polyak":
            with torch.no_grad():
                for t, o in zip(self.target_net.parameters(), self.q_net.parameters()):
                    t.lerp_(o, self.tau)
        elif self.trainer.global_step % self.target_update_every == 0:
            self.target_net.load_state_dict(self.q_net.state_dict())
