"""Chapter 9, reinforcement learning: returns/GAE and the PPO objective against hand-computed values,
the replay buffer, the target network's update interval, rollout collection with episode ends and
time limits, env-id errors, and seeded learning checks of dqn, reinforce, a2c and ppo on CartPole-v1."""

from __future__ import annotations

import math

import gymnasium as gym
import lightning as L
import numpy as np
import pytest
import torch
from litlab import registry, runner
from litlab.chapters.rl.buffers import ReplayBuffer
from litlab.chapters.rl.data import GymReplayData, GymRolloutData
from litlab.chapters.rl.dqn import DQN
from litlab.chapters.rl.envs import EnvPool, env_spec, to_env_actions
from litlab.chapters.rl.policy_gradient import A2C, Reinforce
from litlab.chapters.rl.ppo import PPO, ppo_clip_objective
from litlab.chapters.rl.returns import complete_episode_mask, discounted_returns, gae
from litlab.chapters.rl.schedules import ExponentialSchedule, LinearSchedule
from litlab.config import OptimConfig
from litlab.errors import ConfigError

registry.load_all()


# ------------------------------------------------------------------ a tiny deterministic env
class Corridor(gym.Env):
    """Cells 0..n-1, start at 0; action 1 steps right, 0 left (a wall at 0); reaching n-1 pays +1 and
    terminates. Observation: the cell number, as a float (1,)."""

    def __init__(self, n: int = 4, render_mode=None):
        self.n, self.render_mode = n, render_mode
        self.observation_space = gym.spaces.Box(0.0, float(n), (1,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.pos = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.pos = max(0, self.pos + (1 if int(action) == 1 else -1))
        done = self.pos == self.n - 1
        return np.array([float(self.pos)], np.float32), float(done), done, False, {}


gym.register("LitlabCorridor-v0", entry_point=Corridor, max_episode_steps=4, kwargs={"n": 4})


class FixedAgent:
    """Always the same action; V(s) = cell + 10 (so bootstrap values are recognisable)."""

    device = torch.device("cpu")
    batches_per_rollout = 1

    def __init__(self, action: int):
        self.action = action

    def explore(self, obs, env_steps):
        n = obs.shape[0]
        return {"action": torch.full((n,), self.action), "log_prob": torch.zeros(n), "value": self.value(obs)}

    def value(self, obs):
        return obs[:, 0] + 10.0


# ------------------------------------------------------------------ returns and advantages
def test_discounted_returns_by_hand_with_an_episode_end():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    dones = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])  # the first episode ends at t = 2
    g = discounted_returns(rewards, dones, gamma=0.5, last_value=10.0)
    # G4 = 5 + .5*10 = 10, G3 = 4 + .5*10 = 9, G2 = 3 (end), G1 = 2 + .5*3 = 3.5, G0 = 1 + .5*3.5 = 2.75
    assert torch.allclose(g, torch.tensor([2.75, 3.5, 3.0, 9.0, 10.0]))
    # (T, N): two envs at once, each its own column
    both = discounted_returns(torch.stack([rewards, rewards.flip(0)], 1), torch.stack([dones, dones], 1), 0.5,
                              torch.tensor([10.0, 0.0]))
    assert torch.allclose(both[:, 0], g)
    assert torch.allclose(both[:, 1], torch.tensor([5 + .5 * (4 + .5 * 3), 4 + .5 * 3, 3.0, 2 + .5 * 1, 1.0]))


def test_gae_by_hand_and_against_the_sum_of_discounted_td_errors():
    rewards = torch.tensor([1.0, 0.0, 2.0])
    values = torch.tensor([0.5, 1.0, 1.5])
    dones = torch.tensor([0.0, 1.0, 0.0])
    adv, ret = gae(rewards, values, dones, last_value=2.0, gamma=0.9, lam=0.8)
    # delta2 = 2 + .9*2 - 1.5 = 2.3; delta1 = 0 - 1 = -1 (end); delta0 = 1 + .9*1 - .5 = 1.4
    # A2 = 2.3, A1 = -1, A0 = 1.4 + .9*.8*(-1) = 0.68
    assert torch.allclose(adv, torch.tensor([0.68, -1.0, 2.3]))
    assert torch.allclose(ret, adv + values)

    # Reference: A_t = sum_l (gamma lam)^l delta_{t+l}, summed forward until the episode ends.
    g, lam = 0.97, 0.9
    torch.manual_seed(0)
    T = 12
    r, v = torch.randn(T), torch.randn(T)
    d = torch.zeros(T)
    d[4] = d[9] = 1.0
    last = 0.7
    next_v = torch.cat([v[1:], torch.tensor([last])])
    delta = r + g * (1 - d) * next_v - v
    ref = torch.zeros(T)
    for t in range(T):
        for k in range(t, T):
            ref[t] += (g * lam) ** (k - t) * delta[k]
            if d[k]:
                break
    assert torch.allclose(gae(r, v, d, last, g, lam)[0], ref, atol=1e-5)
    # lambda = 1: the bootstrapped discounted return minus V (A2C's n-step advantage); lambda = 0: delta
    assert torch.allclose(gae(r, v, d, last, g, 1.0)[0], discounted_returns(r, d, g, last) - v, atol=1e-5)
    assert torch.allclose(gae(r, v, d, last, g, 0.0)[0], delta, atol=1e-6)


def test_complete_episode_mask_drops_only_the_cut_tail():
    dones = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert complete_episode_mask(dones).tolist() == [[1, 1], [1, 1], [0, 1], [0, 1], [0, 0]]


def test_epsilon_schedules():
    lin = LinearSchedule(1.0, 0.1, 100)
    assert [lin(0), lin(50), lin(100), lin(1000)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    exp = ExponentialSchedule(1.0, 0.1, 100)
    assert exp(100) == pytest.approx(0.1 + 0.9 * math.exp(-1))


# ------------------------------------------------------------------ PPO's clipped objective
def test_ppo_clip_objective_matches_the_formula_inside_and_outside_the_clip_range():
    ratios = torch.tensor([0.5, 0.5, 1.5, 1.5, 1.1, 0.9])
    adv = torch.tensor([2.0, -2.0, 2.0, -2.0, 1.0, -1.0])
    old = torch.randn(6)
    new = (old + ratios.log()).requires_grad_(True)
    obj = ppo_clip_objective(new, old, adv, clip_eps=0.2)
    # min(r A, clip(r, .8, 1.2) A): 1.0 | -1.6 (clipped) | 2.4 (clipped) | -3.0 | 1.1 | -0.9
    expected = [1.0, -1.6, 2.4, -3.0, 1.1, -0.9]
    assert obj.item() == pytest.approx(sum(expected) / 6, abs=1e-6)
    obj.backward()
    # d/dlogp of r A is r A; where the clipped term is the min, no gradient flows
    assert torch.allclose(new.grad, torch.tensor([1.0, 0.0, 0.0, -3.0, 1.1, -0.9]) / 6, atol=1e-6)


# ------------------------------------------------------------------ replay buffer
def test_replay_buffer_circular_overwrite_sampling_and_state():
    buf = ReplayBuffer(capacity=5, obs_dim=1)
    add = lambda vals: buf.add(torch.tensor(vals, dtype=torch.float32)[:, None], torch.zeros(len(vals)),
                               torch.tensor(vals), torch.tensor(vals)[:, None] + 0.5, torch.zeros(len(vals)))
    add([0, 1, 2])
    assert (len(buf), buf.pos) == (3, 3)
    sample = buf.sample(200, generator=torch.Generator().manual_seed(0))
    assert set(sample["obs"][:, 0].tolist()) == {0.0, 1.0, 2.0}  # only filled rows, all of them
    assert torch.equal(sample["next_obs"], sample["obs"] + 0.5) and torch.equal(sample["rewards"], sample["obs"][:, 0])
    add([3, 4, 5, 6])  # wraps: 5 and 6 overwrite the oldest rows 0 and 1
    assert (len(buf), buf.pos) == (5, 2)
    assert buf.obs[:, 0].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    assert set(buf.sample(300)["obs"][:, 0].tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0}
    copy = ReplayBuffer(capacity=5, obs_dim=1)
    copy.load_state_dict(buf.state_dict())
    assert torch.equal(copy.obs, buf.obs) and (copy.pos, copy.size) == (buf.pos, buf.size)


def test_replay_data_state_holds_the_buffer():
    dm = GymReplayData(buffer_size=100, warmup_steps=40, batch_size=8, updates_per_epoch=3)
    dm.setup("fit")
    batches = list(iter(dm.train_dataloader()))
    assert len(batches) == 3 and batches[0]["obs"].shape == (8, 4)
    assert dm.env_steps == 43 and len(dm.buffer) == 43
    other = GymReplayData(buffer_size=100, warmup_steps=40, batch_size=8, updates_per_epoch=3)
    other.load_state_dict(dm.state_dict())
    assert other.env_steps == 43 and torch.equal(other.buffer.obs, dm.buffer.obs)
    assert other.episode_history == dm.episode_history


# ------------------------------------------------------------------ rollouts, episode ends, time limits
def test_rollout_collection_marks_terminations_and_bootstraps_truncations():
    right = GymRolloutData(env_id="LitlabCorridor-v0", num_envs=1, rollout_steps=5)
    rollout = right.collect_rollout(FixedAgent(1))
    # 0 -> 1 -> 2 -> 3 (goal, terminated at t=2), reset, 0 -> 1 -> 2
    assert rollout.obs[:, 0, 0].tolist() == [0, 1, 2, 0, 1]
    assert rollout.rewards[:, 0].tolist() == [0, 0, 1, 0, 0]
    assert rollout.dones[:, 0].tolist() == [0, 0, 1, 0, 0] and rollout.truncated.sum() == 0
    assert rollout.last_value.tolist() == [12.0]  # V(cell 2)
    assert right.episode_history == [[3.0, 1.0, 3.0]]

    left = GymRolloutData(env_id="LitlabCorridor-v0", num_envs=1, rollout_steps=5)
    rollout = left.collect_rollout(FixedAgent(0))  # never arrives: cut by the 4-step limit at t=3
    assert rollout.dones[:, 0].tolist() == [0, 0, 0, 1, 0] and rollout.truncated[:, 0].tolist() == [0, 0, 0, 1, 0]
    assert rollout.truncation_values[:, 0].tolist() == [0, 0, 0, 10.0, 0]  # V(final cell 0) = 10
    # A2C's n-step targets bootstrap the truncation with gamma * V(s_final), and the cut with V(s_T)
    a2c = A2C(obs_dim=1, action_dim=2, continuous=False, gamma=0.5)
    _, returns, _ = a2c.estimate(rollout)
    assert returns[:, 0].tolist() == pytest.approx([0.625, 1.25, 2.5, 5.0, 5.0])
    # REINFORCE: no bootstrap; the steps after the last end have no Monte-Carlo return (mask 0)
    _, g, mask = Reinforce(obs_dim=1, action_dim=2, continuous=False, gamma=0.5).estimate(rollout)
    assert mask[:, 0].tolist() == [1, 1, 1, 1, 0] and g[:, 0].tolist() == [0, 0, 0, 0, 0]


def test_env_pool_keeps_the_final_observation_of_a_time_limit_episode():
    pool = EnvPool("LitlabCorridor-v0", 2, seed=0)  # env 0 always left, env 1 always right
    for _ in range(2):
        step = pool.step(torch.tensor([0, 1]))
    step = pool.step(torch.tensor([0, 1]))  # env 1 arrives: terminated; s' = cell 3, then reset to 0
    assert step.terminated.tolist() == [False, True] and step.finished == [(1.0, 3)]
    assert step.final_obs[1, 0] == 3.0 and step.next_obs[1, 0] == 0.0 and pool.obs[1, 0] == 0.0
    step = pool.step(torch.tensor([0, 1]))  # env 0 hits the 4-step limit: truncated, not terminated
    assert step.truncated.tolist() == [True, False] and step.terminated.tolist() == [False, False]


def test_unknown_env_id_and_wrong_action_space_are_config_errors():
    base = {"name": "x", "model": {"name": "ppo"}, "data": {"name": "gym_rollout", "env_id": "NoSuchEnv-v0"}}
    with pytest.raises(ConfigError) as e:
        runner.load_config(base)
    assert e.value.key == "data.env_id" and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:  # valid config, impossible model: raised when the runner builds it
        runner.run({**base, "model": {"name": "dqn"}, "data": {"name": "gym_replay", "env_id": "Pendulum-v1"},
                    "tracking": {"mlflow": False}})
    assert e.value.key == "data.env_id" and "discrete" in str(e.value)
    assert env_spec("Pendulum-v1").continuous and env_spec("FrozenLake-v1").obs_dim == 16  # one-hot states
    with pytest.raises(ConfigError) as e:  # an on-policy learner on replay data: caught when fit starts
        runner.run({**base, "model": {"name": "ppo"}, "data": {"name": "gym_replay", "warmup_steps": 8},
                    "tracking": {"mlflow": False}, "trainer": {"fast_dev_run": True}})
    assert e.value.key == "data.name" and "gym_rollout" in str(e.value)


def test_gaussian_policy_log_prob_and_clipped_env_actions():
    torch.manual_seed(0)
    spec = env_spec("Pendulum-v1")
    model = PPO(obs_dim=spec.obs_dim, action_dim=spec.action_dim, continuous=True, init_log_std=0.5)
    obs = torch.randn(64, 3)
    out = model.explore(obs, 0)
    mu, sigma = model(obs), math.exp(0.5)
    ref = (-0.5 * ((out["action"] - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert out["action"].shape == (64, 1) and torch.allclose(out["log_prob"], ref, atol=1e-5)
    assert torch.equal(model.greedy(obs), mu)
    big = torch.tensor([[-5.0], [0.3], [7.0]])
    assert to_env_actions(spec, big).tolist() == [[-2.0], [pytest.approx(0.3)], [2.0]]


# ------------------------------------------------------------------ DQN's target network
def _fit(model, dm, steps, callbacks=(), tmp_path=None):
    model.optim_config = OptimConfig(lr=1e-3)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=list(callbacks), default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    return trainer


@pytest.mark.parametrize("mode", ["hard", "polyak"])
def test_target_network_changes_only_at_its_update_interval(mode, tmp_path):
    torch.manual_seed(0)
    dm = GymReplayData(buffer_size=200, warmup_steps=32, batch_size=16, updates_per_epoch=100)
    model = DQN(obs_dim=4, action_dim=2, continuous=False, hidden=[16], target_update=mode,
                target_update_every=3, tau=0.1)
    targets, onlines = [], []  # snapshots before every optimiser step and at the end

    class Watch(L.Callback):
        def snap(self, module):
            targets.append([p.detach().clone() for p in module.target_net.parameters()])
            onlines.append([p.detach().clone() for p in module.q_net.parameters()])

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.snap(module)

        def on_train_end(self, trainer, module):
            self.snap(module)

    _fit(model, dm, 10, [Watch()], tmp_path)
    assert len(targets) == 11
    changed = []
    for k in range(1, 11):  # snapshot k: after optimiser step k (and the module's target update)
        before, after, online = targets[k - 1], targets[k], onlines[k]
        changed.append(any(not torch.equal(a, b) for a, b in zip(before, after)))
        if mode == "hard" and changed[-1]:
            assert all(torch.equal(t, o) for t, o in zip(after, online))  # a copy of the online net
        if mode == "polyak":  # theta_target <- 0.9 theta_target + 0.1 theta_online
            assert all(torch.allclose(t, 0.9 * b + 0.1 * o, atol=1e-6) for t, b, o in zip(after, before, online))
    if mode == "hard":
        assert changed == [k % 3 == 0 for k in range(1, 11)]  # after optimiser steps 3, 6, 9 only
    else:
        assert all(changed)
    assert not any(p.requires_grad for p in model.target_net.parameters())


def test_each_rollout_is_collected_after_the_previous_update(tmp_path):
    """The datasets have a length, so Lightning does not prefetch: rollout k is played by the
    policy after k optimiser steps (exactly on-policy), and PPO's E x M batches come per rollout."""
    for model, steps, expected in (
        (A2C(obs_dim=4, action_dim=2, continuous=False, hidden=[8]), 4, [0, 0, 1, 1, 2, 2, 3, 3]),
        (PPO(obs_dim=4, action_dim=2, continuous=False, hidden=[8], update_epochs=2, num_minibatches=2), 8,
         [0, 0, 4, 4]),
    ):
        seen = []
        explore = model.explore
        model.explore = lambda obs, env_steps, explore=explore: (seen.append(model.trainer.global_step),
                                                                 explore(obs, env_steps))[1]
        _fit(model, GymRolloutData(num_envs=1, rollout_steps=2, rollouts_per_epoch=100), steps, tmp_path=tmp_path)
        assert seen == expected


# ------------------------------------------------------------------ learning checks (seeded, seconds)
def _greedy_return(model, episodes=10) -> float:
    from litlab.chapters.rl.envs import run_episodes

    with torch.no_grad():
        returns, _, _ = run_episodes("CartPole-v1", model.greedy, episodes, seed=20_000)
    return float(returns.mean())


LEARNERS = {
    # name: (model, data, optimiser steps)
    "ppo": (lambda: PPO(obs_dim=4, action_dim=2, continuous=False, gamma=0.98, gae_lambda=0.8, update_epochs=10,
                        num_minibatches=1, entropy_coef=0.0),
            lambda: GymRolloutData(num_envs=8, rollout_steps=32, rollouts_per_epoch=40), 400),
    "a2c": (lambda: A2C(obs_dim=4, action_dim=2, continuous=False),
            lambda: GymRolloutData(num_envs=8, rollout_steps=5, rollouts_per_epoch=600), 600),
    "reinforce": (lambda: Reinforce(obs_dim=4, action_dim=2, continuous=False, normalize_advantages=True),
                  lambda: GymRolloutData(num_envs=8, rollout_steps=250, rollouts_per_epoch=20), 20),
    "dqn": (lambda: DQN(obs_dim=4, action_dim=2, continuous=False, hidden=[64, 64], target_update_every=100,
                        eps_decay_steps=2000),
            lambda: GymReplayData(warmup_steps=500, updates_per_epoch=2000), 2000),
}


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_agent_learns_cartpole(name, tmp_path):
    make_model, make_data, steps = LEARNERS[name]
    L.seed_everything(0, verbose=False)
    model, dm = make_model(), make_data()
    before = _greedy_return(model)
    _fit(model, dm, steps, tmp_path=tmp_path)
    returns = [e[1] for e in dm.episode_history]  # training episodes of the exploring policy, in order
    first, last = np.mean(returns[:10]), np.mean(returns[-10:])
    after = _greedy_return(model)
    print(f"{name}: {len(returns)} episodes, first 10 {first:.1f}, last 10 {last:.1f}, greedy {before:.1f} -> {after:.1f}")
    assert last > 2 * first and after > 2 * before and after > 60


# ------------------------------------------------------------------ through the runner: files, checkpoint, resume
def test_runner_logs_returns_gif_and_resumes_with_the_replay_buffer(tracking_uri, tmp_path):
    from mlflow import MlflowClient
    from PIL import Image

    cfg = {"name": "dqn_tiny", "seed": 0,
           "model": {"name": "dqn", "hidden": [16], "eps_decay_steps": 200},
           "data": {"name": "gym_replay", "buffer_size": 1000, "warmup_steps": 50, "batch_size": 16,
                    "updates_per_epoch": 40, "eval_episodes": 2, "gif_max_frames": 6},
           "trainer": {"max_epochs": 1, "enable_progress_bar": False},
           "callbacks": {"checkpoint": {"monitor": "val/return", "mode": "max"}},
           "tracking": {"system_metrics": False, "log_checkpoints": False}}
    first = runner.run(cfg, tracking_uri=tracking_uri, quiet=True)
    assert first.status == "FINISHED" and {"test/return", "test/episode_length"} <= set(first.metrics)
    c = MlflowClient(tracking_uri)
    run = c.get_run(first.run_id)
    assert {"train/episode_return_epoch", "train/loss_epoch", "train/epsilon", "val/return"} <= set(run.data.metrics)
    files = {a.path for folder in ("media", "plots") for a in c.list_artifacts(first.run_id, folder)}
    assert {"media/eval_episode.gif", "plots/returns.png"} <= files
    gif = Image.open(c.download_artifacts(first.run_id, "media/eval_episode.gif", str(tmp_path)))
    assert gif.format == "GIF" and gif.size == (300, 200) and gif.n_frames >= 2

    state = torch.load(first.last_checkpoint, weights_only=False)["GymReplayData"]
    assert state["env_steps"] == 50 + 40 and state["buffer"]["size"] == 90
    resumed = runner.resume(first.run_id, ["trainer.max_epochs=2"], tracking_uri=tracking_uri)
    state = torch.load(resumed.last_checkpoint, weights_only=False)["GymReplayData"]
    assert state["env_steps"] == 50 + 2 * 40  # no second warm-up: the buffer came back from the checkpoint
    assert state["buffer"]["size"] == 130 and len(state["episode_history"]) >= 4
