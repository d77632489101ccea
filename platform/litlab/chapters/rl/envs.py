"""Gymnasium environments by id: checking an id, a small vectorised pool, greedy evaluation episodes.

`make_env(env_id)` builds one environment (observations flattened to a 1-D float vector, e.g. a
Discrete state becomes one-hot); an unknown id, or one whose package is not installed, is the
user's mistake and raises ConfigError naming the config key. `EnvPool` steps N copies in lockstep
and resets each copy as soon as its episode ends, keeping the last observation of a time-limit
episode (`final_obs`) so that learners can bootstrap from it. `run_episodes` plays K whole
episodes with a given policy (the evaluation of val/return and test/return), optionally
recording rgb frames of the first one for a GIF.

Episode ends: `terminated` = the MDP reached a terminal state (no future reward: bootstrap with 0);
`truncated` = cut by a time limit (the state still has a value: bootstrap with V(final_obs)).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from litlab.errors import ConfigError


@dataclass(frozen=True)
class EnvSpec:
    env_id: str
    obs_dim: int
    action_dim: int  # number of actions (discrete) or the action vector's size (continuous)
    continuous: bool
    action_low: tuple[float, ...] = ()  # continuous only: the Box bounds actions are clipped to
    action_high: tuple[float, ...] = ()
    action_start: int = 0  # discrete only: gymnasium's Discrete(n, start)
    max_episode_steps: int | None = None
    render_fps: int = 30


def make_env(env_id: str, render_mode: str | None = None, key: str = "data.env_id"):
    """One gymnasium env with a flat float observation; ConfigError(key) if it cannot be made."""
    import gymnasium as gym
    from gymnasium.wrappers import FlattenObservation

    if not isinstance(env_id, str) or not env_id:
        raise ConfigError(key, f"expected a gymnasium environment id such as 'CartPole-v1', got {env_id!r}")
    if render_mode == "rgb_array":
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # off-screen frames: no display (and no SDL warning)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "using the latest version of the unversioned id"
            env = gym.make(env_id, render_mode=render_mode)
    except (gym.error.Error, ImportError, ModuleNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(key, f"cannot make gymnasium environment {env_id!r}: {first}") from None
    obs_space, act_space = env.observation_space, env.action_space
    if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1):
        env = FlattenObservation(env)  # images, Discrete (one-hot), Tuple/Dict -> one flat vector
    if isinstance(act_space, gym.spaces.Box) and len(act_space.shape) != 1:
        env.close()
        raise ConfigError(key, f"{env_id}: only 1-D Box or Discrete action spaces are supported, got {act_space}")
    if not isinstance(act_space, (gym.spaces.Box, gym.spaces.Discrete)):
        env.close()
        raise ConfigError(key, f"{env_id}: only Discrete or 1-D Box action spaces are supported, got {act_space}")
    return env


@functools.lru_cache(maxsize=64)
def env_spec(env_id: str, key: str = "data.env_id") -> EnvSpec:
    import gymnasium as gym

    env = make_env(env_id, key=key)
    try:
        obs_dim = int(np.prod(env.observation_space.shape))
        act = env.action_space
        spec = env.spec
        common = {"env_id": env_id, "obs_dim": obs_dim, "max_episode_steps": spec.max_episode_steps if spec else None,
                  "render_fps": int(env.metadata.get("render_fps") or 30)}
        if isinstance(act, gym.spaces.Discrete):
            return EnvSpec(action_dim=int(act.n), continuous=False, action_start=int(act.start), **common)
        return EnvSpec(action_dim=int(act.shape[0]), continuous=True, action_low=tuple(map(float, act.low)),
                       action_high=tuple(map(float, act.high)), **common)
    finally:
        env.close()


def to_env_actions(spec: EnvSpec, actions: torch.Tensor) -> np.ndarray:
    """Policy actions (N,) int or (N, A) float -> what env.step takes (clipped to the Box bounds;
    the learner keeps the unclipped Gaussian sample, whose log-probability it knows)."""
    a = actions.detach().cpu().numpy()
    if spec.continuous:
        return np.clip(a, np.asarray(spec.action_low), np.asarray(spec.action_high)).astype(np.float32)
    return a.astype(np.int64) + spec.action_start


@dataclass
class PoolStep:
    next_obs: np.ndarray  # (N, D): the observation to act on next (the reset one where an episode ended)
    reward: np.ndarray  # (N,)
    terminated: np.ndarray  # (N,) bool
    truncated: np.ndarray  # (N,) bool (and not terminated)
    final_obs: np.ndarray  # (N, D): the true next state s_{t+1} (before any reset)
    finished: list[tuple[float, int]] = field(default_factory=list)  # (return, length) of episodes that ended


class EnvPool:
    """N copies of one env stepped in lockstep (a synchronous vector env, spelled out)."""

    def __init__(self, env_id: str, num_envs: int, seed: int):
        self.spec = env_spec(env_id)
        self.envs = [make_env(env_id) for _ in range(num_envs)]
        self.obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(self.envs)]).astype(np.float32)
        self.episode_return = np.zeros(num_envs)
        self.episode_length = np.zeros(num_envs, dtype=np.int64)

    @property
    def num_envs(self) -> int:
        return len(self.envs)

    def step(self, actions: torch.Tensor) -> PoolStep:
        acts = to_env_actions(self.spec, actions)
        n = self.num_envs
        final_obs = np.empty_like(self.obs)
        reward = np.zeros(n, dtype=np.float32)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        finished = []
        for i, env in enumerate(self.envs):
            obs, r, term, trunc, _ = env.step(acts[i])
            final_obs[i] = obs
            reward[i], terminated[i], truncated[i] = r, term, trunc and not term
            self.episode_return[i] += r
            self.episode_length[i] += 1
            if term or trunc:
                finished.append((float(self.episode_return[i]), int(self.episode_length[i])))
                self.episode_return[i], self.episode_length[i] = 0.0, 0
                obs, _ = env.reset()  # the env's own RNG continues: seeded once, deterministic
            self.obs[i] = obs
        return PoolStep(self.obs.copy(), reward, terminated, truncated, final_obs, finished)

    def close(self) -> None:
        for env in self.envs:
            env.close()


def run_episodes(env_id: str, policy: Callable[[torch.Tensor], torch.Tensor], episodes: int, seed: int,
                 record_first: int = 0, frame_stride: int = 2,
                 device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray, list]:
    """Play `episodes` whole episodes (env i reset with seed + i), all in lockstep so that the policy
    sees one batch (K_active, D) per step. Returns (returns (K,), lengths (K,), frames): `frames`
    holds up to `record_first` rgb arrays of the first episode (rendered only if > 0): every
    `frame_stride`-th step, subsampled by `frame_stride` in height and width (H/s, W/s, 3)."""
    spec = env_spec(env_id)
    envs = [make_env(env_id, render_mode="rgb_array" if (i == 0 and record_first > 0) else None)
            for i in range(episodes)]
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]).astype(np.float32)
    returns = np.zeros(episodes)
    lengths = np.zeros(episodes, dtype=np.int64)
    active = np.ones(episodes, dtype=bool)
    frames = [envs[0].render()[::frame_stride, ::frame_stride]] if record_first > 0 else []
    try:
        while active.any():
            idx = np.flatnonzero(active)
            actions = to_env_actions(spec, policy(torch.as_tensor(obs[idx], device=device)))
            for j, i in enumerate(idx):
                o, r, term, trunc, _ = envs[i].step(actions[j])
                obs[i] = o
                returns[i] += r
                lengths[i] += 1
                if term or trunc:
                    active[i] = False
                if i == 0 and 0 < len(frames) < record_first and lengths[0] % frame_stride == 0:
                    frames.append(envs[0].render()[::frame_stride, ::frame_stride])
    finally:
        for env in envs:
            env.close()
    return returns, lengths, frames
