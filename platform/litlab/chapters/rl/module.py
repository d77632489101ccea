"""`RLModule`: what the chapter 9 LightningModules share (the agent side of chapters/rl/data.py).

An agent is the LightningModule itself: `explore(obs, env_steps)` is the behaviour policy the data
module acts with, `greedy(obs)` the deterministic policy that evaluation plays. This base logs
what every algorithm reports:

- train/episode_return, train/episode_length: episodes of the behaviour policy that ended while the
  batch was collected (per step when some ended; the epoch value is the mean over its episodes);
- val/return (mean over data.eval_episodes greedy episodes, every epoch), val/return_std,
  val/episode_length; test/return, test/return_std, test/episode_length the same at test;
- plots/returns.png at the end of fit (training episodes and val/return against env steps), and
  media/eval_episode.gif after test (one greedy test episode of the tested weights).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar

import torch

from litlab.chapters.rl.media import log_file, returns_figure, write_gif
from litlab.module import LitlabModule

CHAPTER = "9 Reinforcement learning"


class RLModule(LitlabModule):
    interaction: ClassVar[str]  # "replay" (data.name=gym_replay) or "rollout" (data.name=gym_rollout)

    def __init__(self):
        super().__init__()
        self.eval_history: list[list[float]] = []  # [env steps, mean greedy return] per validation

    # -- the policy the data module uses ------------------------------------------------------
    def explore(self, obs: torch.Tensor, env_steps: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def smoke_forward(self, batch) -> torch.Tensor:
        return self(batch["obs"])

    # -- fit-time checks ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        wanted = {"replay": "gym_replay", "rollout": "gym_rollout"}[self.interaction]
        have = getattr(dm, "registry_name", None)
        if have in ("gym_replay", "gym_rollout") and have != wanted:
            from litlab.errors import ConfigError

            raise ConfigError("data.name", f"{self.registry_name} learns from "
                              f"{'a replay buffer' if self.interaction == 'replay' else 'on-policy rollouts'}: "
                              f"use data.name={wanted}, not {have}")

    # -- logging ------------------------------------------------------------------------------
    def log_episodes(self, batch) -> None:
        returns = batch["episode_return"]
        if returns.numel():  # numel is metadata: no device sync
            n = returns.numel()
            self.log("train/episode_return", returns.mean(), on_step=True, on_epoch=True, batch_size=n)
            self.log("train/episode_length", batch["episode_length"].mean(), on_step=True, on_epoch=True, batch_size=n)

    def _evaluation_step(self, batch, stage: str) -> None:
        returns, lengths = batch["return"], batch["length"]  # (K,) greedy episodes
        k = returns.numel()
        self.log(f"{stage}/return", returns.mean(), batch_size=k, prog_bar=stage == "val")
        self.log(f"{stage}/return_std", returns.std(unbiased=False), batch_size=k)
        self.log(f"{stage}/episode_length", lengths.mean(), batch_size=k)
        if stage == "val" and not self.trainer.sanity_checking:
            self.eval_history.append([float(batch["env_steps"]), float(returns.mean())])  # once per evaluation

    def validation_step(self, batch, batch_idx):
        self._evaluation_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluation_step(batch, "test")

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["rl_eval_history"] = [list(e) for e in self.eval_history]

    def on_load_checkpoint(self, checkpoint) -> None:
        self.eval_history = [list(e) for e in checkpoint.get("rl_eval_history", [])]

    # -- files at the end ---------------------------------------------------------------------
    def _stores_files(self) -> bool:
        return not self.trainer.fast_dev_run and any(hasattr(lg, "log_figure") or hasattr(lg, "log_artifact")
                                                     for lg in self.loggers)

    def on_fit_end(self) -> None:
        dm = self.trainer.datamodule
        if not self._stores_files() or not hasattr(dm, "episode_history"):
            return
        spec = dm.spec
        fig = returns_figure([tuple(e) for e in dm.episode_history], [tuple(e) for e in self.eval_history],
                             f"{self.registry_name} on {spec.env_id}",
                             max_return=spec.max_episode_steps if spec.env_id.startswith("CartPole") else None)
        self.log_figure(fig, "plots/returns.png")

    def on_test_end(self) -> None:
        dm = self.trainer.datamodule
        if not self._stores_files() or not hasattr(dm, "record_episode"):
            return

        def policy(obs):
            with torch.no_grad():
                return self.greedy(obs)

        frames, _ = dm.record_episode(policy, device=self.device)
        if frames:
            with tempfile.TemporaryDirectory() as tmp:
                path = write_gif(frames, Path(tmp) / "eval_episode.gif", fps=dm.spec.render_fps / 2)  # every 2nd step
                log_file(self, path, "media")
