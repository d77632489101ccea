"""Experience storage, apart from the networks: a circular replay buffer (off-policy, DQN) and a
rollout storage (on-policy: REINFORCE, A2C, PPO). Plain tensors on the CPU, no Lightning.

ReplayBuffer: transitions (s, a, r, s', terminated) in fixed-size arrays; the write position wraps
around, so once full every new transition overwrites the oldest. `sample(B)` draws B indices
uniformly with replacement from the filled part. `state_dict()` holds the filled rows and the write
position (a resumed DQN run continues with the same buffer).

RolloutStorage: T steps x N envs written in time order by the current policy, with what the
learners need: log pi(a|s) of the behaviour policy, V(s) at collection time, r, done, and
V(final_obs) at time-limit truncations (bootstrap). It is refilled by every rollout; nothing of it
needs to survive a checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch


class ReplayBuffer:
    def __init__(self, capacity: int, obs_dim: int, action_shape: tuple[int, ...] = (),
                 action_dtype: torch.dtype = torch.long):
        self.capacity = capacity
        self.obs = torch.zeros(capacity, obs_dim)  # (C, D)
        self.next_obs = torch.zeros(capacity, obs_dim)  # (C, D): s_{t+1}, the true next state (before a reset)
        self.actions = torch.zeros((capacity, *action_shape), dtype=action_dtype)  # (C,) or (C, A)
        self.rewards = torch.zeros(capacity)  # (C,)
        self.terminated = torch.zeros(capacity)  # (C,) 1.0: no bootstrap from s_{t+1}
        self.pos = 0  # next row to write
        self.size = 0  # rows filled (<= capacity)

    def __len__(self) -> int:
        return self.size

    def add(self, obs, actions, rewards, next_obs, terminated) -> None:
        """Append N transitions (leading dim N); rows pos, pos+1, ... modulo capacity."""
        obs = torch.as_tensor(obs, dtype=torch.float32)
        n = obs.shape[0]
        if n > self.capacity:
            raise ValueError(f"adding {n} transitions to a buffer of capacity {self.capacity}")
        idx = (self.pos + torch.arange(n)) % self.capacity
        self.obs[idx] = obs
        self.next_obs[idx] = torch.as_tensor(next_obs, dtype=torch.float32)
        self.actions[idx] = torch.as_tensor(actions, dtype=self.actions.dtype)
        self.rewards[idx] = torch.as_tensor(rewards, dtype=torch.float32)
        self.terminated[idx] = torch.as_tensor(terminated, dtype=torch.float32)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        if self.size == 0:
            raise RuntimeError("sampling from an empty replay buffer")
        idx = torch.randint(0, self.size, (batch_size,), generator=generator)
        return {"obs": self.obs[idx], "actions": self.actions[idx], "rewards": self.rewards[idx],
                "next_obs": self.next_obs[idx], "terminated": self.terminated[idx]}

    # Rows [0, size) are always the filled ones (writing starts at row 0), so they are all we save.
    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {"capacity": self.capacity, "pos": self.pos, "size": n, "obs": self.obs[:n].clone(),
                "next_obs": self.next_obs[:n].clone(), "actions": self.actions[:n].clone(),
                "rewards": self.rewards[:n].clone(), "terminated": self.terminated[:n].clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity or state["obs"].shape[1:] != self.obs.shape[1:]:
            raise ValueError(f"replay buffer state of capacity {state['capacity']} and observations "
                             f"{tuple(state['obs'].shape[1:])} does not fit this buffer "
                             f"({self.capacity}, {tuple(self.obs.shape[1:])})")
        n = state["size"]
        for name in ("obs", "next_obs", "actions", "rewards", "terminated"):
            getattr(self, name)[:n] = state[name]
        self.pos, self.size = state["pos"], n


class RolloutStorage:
    """T steps of N envs; `add()` writes step t; `finish(last_value)` closes the rollout."""

    def __init__(self, num_steps: int, num_envs: int, obs_dim: int, action_shape: tuple[int, ...] = (),
                 action_dtype: torch.dtype = torch.long):
        t, n = num_steps, num_envs
        self.num_steps, self.num_envs = t, n
        self.obs = torch.zeros(t, n, obs_dim)  # (T, N, D): s_t
        self.actions = torch.zeros((t, n, *action_shape), dtype=action_dtype)  # (T, N) or (T, N, A)
        self.log_probs = torch.zeros(t, n)  # log pi_old(a_t|s_t) of the behaviour policy
        self.values = torch.zeros(t, n)  # V(s_t) at collection time
        self.rewards = torch.zeros(t, n)
        self.dones = torch.zeros(t, n)  # 1.0 where the episode ended at step t (terminated or truncated)
        self.truncated = torch.zeros(t, n)  # 1.0 where it ended by a time limit only
        self.truncation_values = torch.zeros(t, n)  # V(s_{t+1}) at truncations, else 0
        self.last_value = torch.zeros(n)  # V(s_T): bootstrap for the episodes the rollout cuts
        self.step = 0
        self.episode_returns: list[float] = []  # episodes that ended during this rollout
        self.episode_lengths: list[int] = []

    @property
    def full(self) -> bool:
        return self.step >= self.num_steps

    def reset(self) -> None:
        self.step = 0
        self.episode_returns, self.episode_lengths = [], []

    def add(self, obs, actions, log_probs, values, rewards, terminated, truncated, truncation_values) -> None:
        t = self.step
        if t >= self.num_steps:
            raise RuntimeError("rollout storage is full: call reset() first")
        self.obs[t] = torch.as_tensor(obs, dtype=torch.float32)
        self.actions[t] = actions
        self.log_probs[t] = log_probs
        self.values[t] = values
        self.rewards[t] = torch.as_tensor(rewards, dtype=torch.float32)
        term = torch.as_tensor(terminated, dtype=torch.float32)
        trunc = torch.as_tensor(truncated, dtype=torch.float32)
        self.dones[t] = torch.maximum(term, trunc)
        self.truncated[t] = trunc
        self.truncation_values[t] = truncation_values * trunc
        self.step += 1

    def finish(self, last_value: torch.Tensor) -> None:
        self.last_value = last_value

    def flat(self, **per_step: torch.Tensor) -> dict[str, torch.Tensor]:
        """Samples (T*N, ...) for minibatching: obs, actions, log_probs, values, plus the (T, N)
        tensors passed in (advantages, returns, ...), flattened the same way; copies, so the storage
        can be refilled while the batch is still referenced."""
        t, n = self.num_steps, self.num_envs
        out = {"obs": self.obs, "actions": self.actions, "log_probs": self.log_probs, "values": self.values, **per_step}
        return {k: v.reshape(t * n, *v.shape[2:]).clone() for k, v in out.items()}
