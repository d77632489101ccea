"""Shared test helpers: run the CLI, read a tracking store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# experiments/**/online/*.yaml need the internet (e.g. Cora): validated offline, never trained in tests.
ALL_EXPERIMENTS = sorted((REPO / "experiments").rglob("*.yaml"))
ONLINE_EXPERIMENTS = [p for p in ALL_EXPERIMENTS if "online" in p.relative_to(REPO / "experiments").parts]
EXPERIMENTS = [p for p in ALL_EXPERIMENTS if p not in ONLINE_EXPERIMENTS]
MLP_DIGITS = REPO / "experiments" / "mlp" / "mlp_digits.yaml"

# A small, quick MLP run used by the tracking/resume tests (~2-4 s of training).
QUICK = [
    "model.hidden=[32]",
    "data.batch_size=64",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=5",
    "tracking.system_metrics_interval=1",
    "tracking.flush_interval=0.5",
]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(REPO / "platform") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def litlab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "litlab", *args]


def run_cli(*args: str, cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(litlab_cmd(*args), cwd=cwd, env=cli_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def all_runs(uri: str, include_deleted: bool = False):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    c = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    if not exps:
        return []
    view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY
    return c.search_runs(exps, run_view_type=view)


def metric_steps(uri: str, run_id: str) -> dict[str, list[int]]:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    run = c.get_run(run_id)
    return {k: [m.step for m in c.get_metric_history(run_id, k)] for k in run.data.metrics}


def smoke_benchmark_runs(names: tuple[str, ...] | None = None) -> list:
    """benchmarks/throughput.py's configs at their CPU smoke sizes, as pytest params (source,
    overrides) with the benchmark's name as id; trainer.max_epochs is left to the test."""
    import pytest

    sys.path.insert(0, str(REPO / "benchmarks"))
    import throughput

    throughput.register_bench_data()
    return [pytest.param(b.source if isinstance(b.source, dict) else str(REPO / b.source),
                         [o for o in b.overrides if not o.startswith("trainer.max_epochs")], id=name)
            for name, b in throughput.benches(smoke=True, epochs=None).items() if names is None or name in names]
