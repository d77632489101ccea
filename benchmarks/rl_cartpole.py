"""Learning bar of chapter 9: DQN and PPO reach a mean evaluation return >= 475 on CartPole-v1.

Runs experiments/rl/dqn_cartpole.yaml and experiments/rl/ppo_cartpole.yaml through the litlab
runner (fixed seed, CPU, one thread) and prints, per experiment, the best val/return (mean of 10
greedy episodes, the checkpoint kept), test/return (that checkpoint on 10 other episodes) and the
wall time. Exit status 1 if a test/return is below the bar. Minutes, not a unit test:

    OMP_NUM_THREADS=1 PYTHONPATH=platform .venv/bin/python benchmarks/rl_cartpole.py
    ... benchmarks/rl_cartpole.py --only ppo --tracking-uri sqlite:////tmp/rl/mlflow.db  seed=1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

BAR = 475.0
EXPERIMENTS = {"dqn": REPO / "experiments/rl/dqn_cartpole.yaml", "ppo": REPO / "experiments/rl/ppo_cartpole.yaml"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(EXPERIMENTS), action="append", help="run only these (repeatable)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: a temporary sqlite store, deleted)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for both configs, e.g. seed=1")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from litlab import runner

    rows = []
    with tempfile.TemporaryDirectory(prefix="rl_cartpole_") as tmp:
        uri = args.tracking_uri or f"sqlite:///{tmp}/mlflow.db"
        for name in args.only or sorted(EXPERIMENTS):
            start = time.perf_counter()
            result = runner.run(EXPERIMENTS[name], [f"callbacks.checkpoint.dirpath={tmp}/checkpoints",
                                                    "trainer.enable_progress_bar=false", *args.overrides],
                                tracking_uri=uri, quiet=True)
            wall = time.perf_counter() - start
            test_return = result.metrics.get("test/return", float("nan"))
            rows.append((name, result.best_score, test_return, wall, result.run_id))
            print(f"{name}: best val/return {result.best_score:.1f}, test/return {test_return:.1f}, "
                  f"wall {wall:.0f} s (run {result.run_id})", flush=True)

    print(f"\n{'experiment':<12}{'val/return':>12}{'test/return':>13}{'wall s':>9}   bar {BAR:g}")
    ok = True
    for name, best, test, wall, _ in rows:
        passed = test >= BAR
        ok &= passed
        print(f"{name:<12}{best:>12.1f}{test:>13.1f}{wall:>9.0f}   {'PASS' if passed else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
