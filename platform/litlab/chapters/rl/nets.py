"""The networks of chapter 9: plain nn.Modules, observations (B, D) in, tensors out.

- `QNetwork`: s -> Q(s, .) for every discrete action (DQN).
- `ActorCritic`: a policy pi(a|s) and a value V(s), as two separate MLPs (no shared trunk: the
  value loss cannot disturb the policy's features, which makes the course settings easy to tune).
  Discrete actions: a categorical distribution over logits. Continuous: a diagonal Gaussian
  N(mu(s), diag(sigma^2)) with a state-independent, learned log sigma.
Orthogonal initialisation as in the PPO implementations (Engstrom et al., 2020): hidden layers gain
sqrt(2), the policy head gain 0.01 (an almost uniform / zero-mean first policy), value head gain 1.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "tanh",
        orthogonal: bool = False, out_gain: float = 1.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden]
    for a, b in itertools.pairwise(dims):
        layers += [_init(nn.Linear(a, b), math.sqrt(2), orthogonal), ACTIVATIONS[activation]()]
    layers.append(_init(nn.Linear(dims[-1], out_dim), out_gain, orthogonal))
    return nn.Sequential(*layers)


def _init(layer: nn.Linear, gain: float, orthogonal: bool) -> nn.Linear:
    if orthogonal:
        nn.init.orthogonal_(layer.weight, gain)
        nn.init.zeros_(layer.bias)
    return layer


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, num_actions: int, hidden: Sequence[int], activation: str = "relu"):
        super().__init__()
        self.body = mlp(obs_dim, hidden, num_actions, activation)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.body(obs)  # (B, D) -> Q (B, A)


class ActorCritic(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, continuous: bool, hidden: Sequence[int],
                 activation: str = "tanh", init_log_std: float = 0.0):
        super().__init__()
        self.continuous = continuous
        self.policy = mlp(obs_dim, hidden, action_dim, activation, orthogonal=True, out_gain=0.01)
        self.critic = mlp(obs_dim, hidden, 1, activation, orthogonal=True, out_gain=1.0)
        if continuous:
            self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))  # (A,)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.policy(obs)  # (B, D) -> logits (B, A) or Gaussian mean (B, A)

    def distribution(self, obs: torch.Tensor) -> Distribution:
        out = self.policy(obs)
        if self.continuous:
            # Independent(.., 1): log_prob and entropy sum over the A action dimensions -> (B,)
            return Independent(Normal(out, self.log_std.exp().expand_as(out), validate_args=False), 1,
                               validate_args=False)
        return Categorical(logits=out, validate_args=False)  # validation reads the device (a host sync) at each call

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)  # (B,)

    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        """The deterministic policy for evaluation: the most likely action / the Gaussian mean."""
        out = self.policy(obs)
        return out if self.continuous else out.argmax(-1)
