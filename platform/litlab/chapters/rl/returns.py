"""Returns and advantages over a rollout of T steps (x N envs), with episode ends inside it.

All functions take time-major tensors (T,) or (T, N); `dones[t] = 1` means the episode ended at
step t, so nothing after t belongs to it. `last_value` (N,) is V(s_T), the bootstrap for an episode
the rollout cuts (0: no bootstrap). A time-limit truncation is handled by the caller: it adds
gamma * V(s_final) to the last reward of the truncated episode (`bootstrap_truncations`) and marks
it done, so the value of the state the limit cut off is not lost (Pardo et al., 2018).

Monte-Carlo return (REINFORCE):   G_t = r_t + gamma * (1 - d_t) * G_{t+1},        G_T = last_value
TD error:                         delta_t = r_t + gamma * (1 - d_t) * V(s_{t+1}) - V(s_t)
GAE(lambda) (Schulman et al.):    A_t = delta_t + gamma * lambda * (1 - d_t) * A_{t+1},  A_T = 0
                                  returns_t = A_t + V(s_t)   (the lambda-return, the value target)
lambda = 1 gives A_t = G_t - V(s_t) with G bootstrapped at the rollout's end: the n-step advantage
of A2C/A3C (n = the steps left in the rollout). lambda = 0 gives the one-step TD error.
"""

from __future__ import annotations

import torch


def discounted_returns(rewards: torch.Tensor, dones: torch.Tensor, gamma: float,
                       last_value: torch.Tensor | float = 0.0) -> torch.Tensor:
    """G_t for every step, computed backwards in time. (T, ...) -> (T, ...)."""
    returns = torch.empty_like(rewards)
    running = torch.as_tensor(last_value, dtype=rewards.dtype).expand_as(rewards[0]).clone()
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + gamma * (1.0 - dones[t]) * running
        returns[t] = running
    return returns


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor | float,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (T, ...): generalised advantage estimation."""
    advantages = torch.empty_like(rewards)
    next_value = torch.as_tensor(last_value, dtype=rewards.dtype).expand_as(rewards[0])
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * not_done * next_value - values[t]
        running = delta + gamma * lam * not_done * running
        advantages[t] = running
        next_value = values[t]
    return advantages, advantages + values


def bootstrap_truncations(rewards: torch.Tensor, truncation_values: torch.Tensor, gamma: float) -> torch.Tensor:
    """r_t + gamma * V(s_final) at time-limit ends (truncation_values is 0 elsewhere)."""
    return rewards + gamma * truncation_values


def complete_episode_mask(dones: torch.Tensor) -> torch.Tensor:
    """1.0 at the steps whose episode ends inside the rollout (at or after t), 0.0 on the tail of an
    episode the rollout cuts: those steps have no Monte-Carlo return yet. (T, ...) -> (T, ...)."""
    ended_later = torch.flip(torch.cummax(torch.flip(dones, [0]), dim=0).values, [0])
    return ended_later


def normalize(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over all entries (or those where mask is 1)."""
    if mask is None:
        return (x - x.mean()) / (x.std(unbiased=False) + eps)
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    std = (((x - mean) ** 2 * mask).sum() / n).sqrt()
    return (x - mean) / (std + eps) * mask
