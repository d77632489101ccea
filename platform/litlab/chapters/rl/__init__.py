"""Chapter 9, deep reinforcement learning on gymnasium environments: DQN (`dqn`), REINFORCE with a
baseline (`reinforce`), advantage actor-critic (`a2c`) and PPO (`ppo`), trained by Lightning on
batches that interaction produces (`gym_replay`, `gym_rollout` in data.py); importing registers them."""

from litlab.chapters.rl import data, dqn, policy_gradient, ppo  # noqa: F401
