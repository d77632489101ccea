"""Interaction-driven DataModules: the training batches are produced by acting in a gymnasium env.

`gym_replay` (off-policy, DQN): every training batch is drawn uniformly from a replay buffer after
`env_steps_per_update` steps of the agent's behaviour policy (epsilon-greedy) were added to it; the
buffer is filled with `warmup_steps` random-policy steps first.
`gym_rollout` (on-policy: REINFORCE, A2C, PPO): every `rollout_steps` steps of `num_envs` envs are
collected with the current policy into a RolloutStorage, and the algorithm turns the rollout into
training batches (`agent.rollout_batches`: one batch for REINFORCE/A2C, epochs x minibatches for PPO).

The agent is the LightningModule the Trainer runs (`explore(obs, env_steps)`, `greedy(obs)`,
`value(obs)`, `rollout_batches(rollout)`, `batches_per_rollout`); iterated on its own (no Trainer)
the data acts with a uniformly random policy. A training epoch is a fixed number of batches
(`updates_per_epoch`, or `rollouts_per_epoch` x batches per rollout), so the dataset has a length
and Lightning does not prefetch: each batch is collected after the previous update was applied.
val and test batches are K whole greedy episodes, played in lockstep with fixed seeds (val: 10000+i,
test: 20000+i, so the checkpoint chosen on val/return is tested on other start states).

Checkpoints hold the env step counter, the episode history and the replay buffer; a resumed run
starts new episodes (a gymnasium env's internal state is not saved).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Annotated, Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from litlab.chapters.rl.buffers import ReplayBuffer, RolloutStorage
from litlab.chapters.rl.envs import EnvPool, env_spec, run_episodes
from litlab.chapters.rl.returns import bootstrap_truncations, gae
from litlab.data.base import LitlabDataModule
from litlab.errors import ConfigError
from litlab.registry import register_data
from litlab.schema import Range

VAL_SEED, TEST_SEED = 10_000, 20_000
# Our datasets define __len__ on purpose (see above); single process, so it is exact.
warnings.filterwarnings("ignore", message=r".*Your `IterableDataset` has `__len__` defined.*")

EnvId = str
Envs = Annotated[int, Range(ge=1, le=1024)]
Episodes = Annotated[int, Range(ge=1, le=10_000)]
Frames = Annotated[int, Range(ge=0, le=5_000)]


class RandomAgent:
    """Uniform random actions (Gaussian N(0, 1) for continuous ones); V = 0; GAE(0.99, 0.95) batches."""

    batches_per_rollout = 1

    def __init__(self, spec, device="cpu"):
        self.spec, self.device = spec, torch.device(device)

    def explore(self, obs: torch.Tensor, env_steps: int) -> dict[str, torch.Tensor]:
        n, a = obs.shape[0], self.spec.action_dim
        if self.spec.continuous:
            dist = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(n, a), 1.0), 1)
            action = dist.sample()
            log_prob = dist.log_prob(action)
        else:
            action = torch.randint(0, a, (n,))
            log_prob = torch.full((n,), -math.log(a))
        return {"action": action, "log_prob": log_prob, "value": torch.zeros(n)}

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(obs.shape[0])

    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        return self.explore(obs, 0)["action"]

    def rollout_batches(self, rollout: RolloutStorage) -> Iterator[dict[str, torch.Tensor]]:
        rewards = bootstrap_truncations(rollout.rewards, rollout.truncation_values, 0.99)
        adv, ret = gae(rewards, rollout.values, rollout.dones, rollout.last_value, 0.99, 0.95)
        yield rollout.flat(advantages=adv, returns=ret, mask=torch.ones_like(adv))


class GymData(LitlabDataModule):
    """What both interaction data modules share: the env, the counters, evaluation episodes."""

    def __init__(self, env_id: str, num_envs: int, eval_episodes: int, gif_max_frames: int, batch_size: int = 1):
        super().__init__(batch_size=batch_size, num_workers=0)  # interaction runs in the training process
        self.env_id = env_id
        self.spec = env_spec(env_id)  # ConfigError("data.env_id") for an unknown id
        self.num_envs, self.eval_episodes, self.gif_max_frames = num_envs, eval_episodes, gif_max_frames
        self.pool: EnvPool | None = None
        self.env_steps = 0  # transitions collected so far, all envs together
        self.episode_history: list[list[float]] = []  # [env step at the end, return, length] per episode
        self._pending: list[tuple[float, int]] = []  # episodes ended since the last training batch

    def info(self) -> dict[str, Any]:
        return {"obs_dim": self.spec.obs_dim, "action_dim": self.spec.action_dim, "continuous": self.spec.continuous}

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.pool is None:
            seed = int(torch.randint(0, 2**31 - 1 - self.num_envs, (1,)))  # follows the run's seed
            self.pool = EnvPool(self.env_id, self.num_envs, seed)

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.pool is not None:
            self.pool.close()
            self.pool = None

    # -- the agent and acting ------------------------------------------------------------------
    def agent(self):
        module = self.trainer.lightning_module if self.trainer is not None else None
        return module if module is not None else RandomAgent(self.spec)

    def act(self, agent, obs) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = agent.explore(torch.as_tensor(obs, device=agent.device), self.env_steps)
        return {k: v.cpu() for k, v in out.items()}

    def step(self, actions: torch.Tensor):
        if self.pool is None:
            self.setup("fit")
        step = self.pool.step(actions)
        self.env_steps += self.pool.num_envs
        for ret, length in step.finished:
            self.episode_history.append([float(self.env_steps), ret, float(length)])
            self._pending.append((ret, length))
        return step

    def take_episode_stats(self) -> dict[str, torch.Tensor]:
        """The returns and lengths (E,) of the episodes ended since the last call (E may be 0)."""
        pending, self._pending = self._pending, []
        return {"episode_return": torch.tensor([p[0] for p in pending], dtype=torch.float32),
                "episode_length": torch.tensor([p[1] for p in pending], dtype=torch.float32)}

    # -- evaluation ----------------------------------------------------------------------------
    def val_dataloader(self):
        return DataLoader(EvaluationEpisodes(self, VAL_SEED), batch_size=None)

    def test_dataloader(self):
        return DataLoader(EvaluationEpisodes(self, TEST_SEED), batch_size=None)

    def record_episode(self, policy, device="cpu") -> tuple[list, float]:
        """Frames of one greedy test episode (for the GIF) and its return."""
        if self.gif_max_frames == 0:
            return [], 0.0
        returns, _, frames = run_episodes(self.env_id, policy, 1, TEST_SEED, record_first=self.gif_max_frames,
                                          device=device)
        return frames, float(returns[0])

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"env_steps": self.env_steps, "episode_history": [list(e) for e in self.episode_history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.env_steps = int(state["env_steps"])
        self.episode_history = [list(e) for e in state["episode_history"]]


class EvaluationEpisodes(IterableDataset):
    """One batch: K greedy episodes of the current policy -> {"return": (K,), "length": (K,)}."""

    def __init__(self, dm: GymData, seed: int):
        self.dm, self.seed = dm, seed

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        agent = self.dm.agent()

        def policy(obs):
            with torch.no_grad():
                return agent.greedy(obs)

        returns, lengths, _ = run_episodes(self.dm.env_id, policy, self.dm.eval_episodes, self.seed,
                                           device=agent.device)
        yield {"return": torch.as_tensor(returns, dtype=torch.float32),
               "length": torch.as_tensor(lengths, dtype=torch.float32), "env_steps": self.dm.env_steps}


@register_data("gym_replay", description="gymnasium env by id; batches sampled from a replay buffer the agent fills (DQN)")
class GymReplayData(GymData):
    def __init__(
        self,
        env_id: EnvId = "CartPole-v1",
        num_envs: Envs = 1,
        buffer_size: Annotated[int, Range(ge=1, le=100_000_000)] = 50_000,
        warmup_steps: Annotated[int, Range(ge=1, le=100_000_000)] = 1_000,  # random-policy steps before learning
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 64,
        env_steps_per_update: Annotated[int, Range(ge=1, le=100_000)] = 1,  # pool steps (x num_envs) per batch
        updates_per_epoch: Annotated[int, Range(ge=1, le=100_000_000)] = 1_000,  # batches between evaluations
        eval_episodes: Episodes = 10,
        gif_max_frames: Frames = 250,  # frames of the test-episode GIF (every 2nd step); 0: no GIF
    ):
        super().__init__(env_id, num_envs, eval_episodes, gif_max_frames, batch_size)
        if buffer_size < num_envs:
            raise ConfigError("data.buffer_size", f"must hold at least one step of the {num_envs} envs")
        self.buffer_size, self.warmup_steps = buffer_size, warmup_steps
        self.env_steps_per_update, self.updates_per_epoch = env_steps_per_update, updates_per_epoch
        self.buffer: ReplayBuffer | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.buffer is None:
            cont = self.spec.continuous
            self.buffer = ReplayBuffer(self.buffer_size, self.spec.obs_dim, (self.spec.action_dim,) if cont else (),
                                       torch.float32 if cont else torch.long)

    def train_dataloader(self):
        return DataLoader(ReplayStream(self), batch_size=None)

    def collect(self, agent, pool_steps: int) -> None:
        for _ in range(pool_steps):
            obs = self.pool.obs.copy()
            out = self.act(agent, obs)
            step = self.step(out["action"])
            # s' = final_obs (the true next state, also at a truncation); bootstrap unless terminated
            self.buffer.add(obs, out["action"], step.reward, step.final_obs, step.terminated)

    def warm_up(self) -> None:
        if self.pool is None or self.buffer is None:
            self.setup("fit")
        random_agent = RandomAgent(self.spec)
        while len(self.buffer) < min(self.warmup_steps, self.buffer_size):
            self.collect(random_agent, 1)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "buffer": self.buffer.state_dict() if self.buffer is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("buffer") is not None:
            self.setup("fit")
            self.buffer.load_state_dict(state["buffer"])


class ReplayStream(IterableDataset):
    def __init__(self, dm: GymReplayData):
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.updates_per_epoch

    def __iter__(self):
        dm = self.dm
        dm.warm_up()
        agent = dm.agent()
        for _ in range(dm.updates_per_epoch):
            dm.collect(agent, dm.env_steps_per_update)
            yield {**dm.buffer.sample(dm.batch_size), **dm.take_episode_stats()}


@register_data("gym_rollout", description="gymnasium env by id; rollouts of the current policy (REINFORCE, A2C, PPO)")
class GymRolloutData(GymData):
    def __init__(
        self,
        env_id: EnvId = "CartPole-v1",
        num_envs: Envs = 4,
        rollout_steps: Annotated[int, Range(ge=1, le=1_000_000)] = 128,  # steps per env per rollout
        rollouts_per_epoch: Annotated[int, Range(ge=1, le=1_000_000)] = 10,  # rollouts between evaluations
        eval_episodes: Episodes = 10,
        gif_max_frames: Frames = 250,
    ):
        super().__init__(env_id, num_envs, eval_episodes, gif_max_frames)
        self.rollout_steps, self.rollouts_per_epoch = rollout_steps, rollouts_per_epoch
        self.storage: RolloutStorage | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.storage is None:
            cont = self.spec.continuous
            self.storage = RolloutStorage(self.rollout_steps, self.num_envs, self.spec.obs_dim,
                                          (self.spec.action_dim,) if cont else (), torch.float32 if cont else torch.long)

    def train_dataloader(self):
        return DataLoader(RolloutStream(self), batch_size=None)

    def collect_rollout(self, agent) -> RolloutStorage:
        if self.pool is None or self.storage is None:
            self.setup("fit")
        rollout = self.storage
        rollout.reset()
        for _ in range(self.rollout_steps):
            obs = self.pool.obs.copy()
            out = self.act(agent, obs)
            step = self.step(out["action"])
            trunc_values = torch.zeros(self.num_envs)
            if step.truncated.any():  # V(s_final) for the time-limit bootstrap
                trunc_values = self._values(agent, step.final_obs)
            rollout.add(obs, out["action"], out["log_prob"], out["value"], step.reward, step.terminated,
                        step.truncated, trunc_values)
        rollout.finish(self._values(agent, self.pool.obs))  # V(s_T) for the episodes the rollout cuts
        return rollout

    @staticmethod
    def _values(agent, obs) -> torch.Tensor:
        with torch.no_grad():
            return agent.value(torch.as_tensor(obs, device=agent.device)).cpu()


class RolloutStream(IterableDataset):
    def __init__(self, dm: GymRolloutData):
        self.dm = dm
        self.agent = dm.agent()

    def __len__(self) -> int:
        return self.dm.rollouts_per_epoch * self.agent.batches_per_rollout

    def __iter__(self):
        for _ in range(self.dm.rollouts_per_epoch):
            rollout = self.dm.collect_rollout(self.agent)
            stats = self.dm.take_episode_stats()
            for batch in self.agent.rollout_batches(rollout):
                yield {**batch, **stats}
                stats = {k: v[:0] for k, v in stats.items()}  # episode stats ride on the first batch only
