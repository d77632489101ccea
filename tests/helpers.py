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

# The digits experiments that tests/test_gpu.py trains under mixed precision (the perceptron learns
# one mistake at a time, with no precision to mix) and what each reaches when it learned: its YAML
# records its CPU result, and each bar sits between that and an untrained model (classifiers: chance
# 0.1; FID: real vs real digits ~2, noise ~370; sample_confidence: real digits 0.95, noise 0.12).
# stem -> [(test metric, ">=" or "<=", bar)]; tests/test_experiments.py checks that each is logged.
DIGITS = [p for p in EXPERIMENTS if "digits" in p.name and "perceptron" not in p.name]
LEARNED_DIGITS: dict[str, list[tuple[str, str, float]]] = {
    "mlp_digits": [("test/acc", ">=", 0.95)],
    "lenet_digits": [("test/acc", ">=", 0.97)],
    "resnet_digits": [("test/acc", ">=", 0.97)],
    **{stem: [("test/acc", ">=", 0.9)] for stem in ("alexnet_digits", "mobilenet_digits", "resnet_18_digits",
                                                    "vgg_11_digits")},
    "autoencoder_digits": [("test/mse", "<=", 0.03), ("test/sample_confidence", ">=", 0.5)],  # CPU 0.012, 0.73
    "vae_digits": [("test/mse", "<=", 0.04), ("test/sample_confidence", ">=", 0.5)],  # 0.016, 0.70
    "beta_vae_digits": [("test/mse", "<=", 0.05), ("test/sample_confidence", ">=", 0.5)],  # 0.023, 0.76
    "ddpm_digits": [("test/fid", "<=", 10.0)],  # 2.9
    "ddim_digits": [("test/fid", "<=", 15.0)],  # 4.7
    "ncsn_digits": [("test/fid", "<=", 20.0)],  # 6.6
    "cfg_digits": [("test/class_accuracy", ">=", 0.9)],  # 1.00
    "dcgan_digits": [("test/fid", "<=", 20.0)],  # 6.2
    "cgan_digits": [("test/class_accuracy", ">=", 0.9)],  # 0.996
    "wgan_gp_digits": [("test/fid", "<=", 30.0)],  # 11.4
    "wgan_clip_digits": [("test/fid", "<=", 80.0)],  # 35.2
    "cyclegan_thicken_digits": [("test/l1_ab", "<=", 0.12)],  # 0.070; doing nothing 0.176
    "pix2pix_inpaint_digits": [("test/l1", "<=", 0.08)],  # 0.037; copying the input 0.169
}


def unlearned(metrics: dict[str, float], bars: list[tuple[str, str, float]]) -> list[str]:
    """The bars `metrics` miss, as 'name value (want OP bar)'; a missing metric misses its bar."""
    missed = []
    for name, op, bar in bars:
        value = metrics.get(name, float("nan"))
        if not (value >= bar if op == ">=" else value <= bar):  # NaN misses either way
            missed.append(f"{name} {value:.4g} (want {op} {bar:g})")
    return missed

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


def run_cli_heavy_imports(*args: str, cwd: Path, timeout: float = 120) -> tuple[int, list[str], str]:
    """`litlab ARGS` in a fresh interpreter: (exit status, which of torch and lightning it imported,
    stderr); a user's mistake told before those imports gives (2, [], its one line)."""
    code = ("import sys\nfrom litlab.cli import main\ncode = main(sys.argv[1:])\n"
            "print(code, ' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning'})))")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)
    status, _, imported = proc.stdout.strip().partition(" ")
    return int(status) if status.lstrip("-").isdigit() else -1, imported.split(), proc.stderr


def run_cli_tail(*args: str, cwd: Path, timeout: float = 300, **env: str) -> tuple[int, str, float]:
    """Run `litlab ARGS` with stdout and stderr on one pipe: (exit status, output, seconds from its
    last line to the pipe's end). The pipe ends when the process and every child holding it have
    exited: what `litlab ... | tee log` waits for. After `timeout` seconds, silent or not, the
    process and its children are killed and TimeoutExpired is raised."""
    import signal
    import threading
    import time

    proc = subprocess.Popen(litlab_cmd(*args), cwd=cwd, env=cli_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    expired = threading.Event()

    def kill_all():  # the whole session: a child holding the pipe would keep the loop below waiting
        expired.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    watchdog = threading.Timer(timeout, kill_all)
    watchdog.start()
    lines, last = [], time.monotonic()
    try:
        for line in proc.stdout:
            lines.append(line)
            last = time.monotonic()
        tail = time.monotonic() - last
        code = proc.wait()
    finally:
        watchdog.cancel()
    if expired.is_set():
        raise subprocess.TimeoutExpired(proc.args, timeout, output="".join(lines))
    return code, "".join(lines), tail


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
