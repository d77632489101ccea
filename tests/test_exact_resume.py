"""Exact resume: a run SIGKILLed in the middle of an epoch and resumed with `litlab resume` ends
bit-identical (weights, optimiser, scheduler) to the uninterrupted run with the same seed, and
logged the same metrics at the same steps (no gap, no duplicate).

The run uses every source of randomness litlab has: a shuffled loader, random augmentation (random
shifts, run per batch) and dropout; the kill lands at a random step of the second epoch."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
import torch
from mlflow import MlflowClient

from helpers import MLP_DIGITS, cli_env, litlab_cmd, run_cli

SETTINGS = [
    "model.hidden=[32]", "model.dropout=0.2", "data.augment=true", "data.batch_size=16",
    "trainer.max_epochs=3", "trainer.log_every_n_steps=1", "trainer.deterministic=true",
    "callbacks.checkpoint.every_n_train_steps=1", "tracking.system_metrics=false", "tracking.flush_interval=0.2",
]
STEPS_PER_EPOCH = 79  # ceil(1257 train images / 16)


def _run_id(stderr_lines) -> str:
    for line in stderr_lines:
        if line.startswith("litlab: started run "):
            return line.split()[3]
    raise AssertionError("no run id printed")


def _step(path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])
    except Exception:  # noqa: BLE001 (not there yet)
        return -1


def _history(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    c = MlflowClient(tracking_uri=uri)
    out = {}
    for key in c.get_run(run_id).data.metrics:
        if key.startswith("system/"):
            continue
        out[key] = sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))
    return out


def _final_state(ckpt_dir) -> dict:
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    return {"weights": ckpt["state_dict"], "optimizer": ckpt["optimizer_states"],
            "schedulers": ckpt["lr_schedulers"], "step": ckpt["global_step"]}


def _assert_identical(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_identical(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a} != {b}"


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = cli_env(OMP_NUM_THREADS="1")

    reference = run_cli("run", str(MLP_DIGITS), "--tracking-uri", uri, *SETTINGS, cwd=tmp_path, OMP_NUM_THREADS="1")
    assert reference.returncode == 0, reference.stderr[-2000:]
    ref_id = _run_id(reference.stderr.splitlines())

    kill_at = random.Random().randrange(STEPS_PER_EPOCH + 5, 2 * STEPS_PER_EPOCH - 5)  # inside epoch 2
    proc = subprocess.Popen(litlab_cmd("run", str(MLP_DIGITS), "--tracking-uri", uri, *SETTINGS), cwd=tmp_path,
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        run_id = _run_id(proc.stderr)
        last = tmp_path / "mlruns" / "checkpoints" / run_id / "last.ckpt"
        deadline = time.time() + 300
        while _step(last) < kill_at and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "training ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_step = _step(last)
    assert STEPS_PER_EPOCH < killed_step < 2 * STEPS_PER_EPOCH, killed_step  # mid-epoch

    resumed = run_cli("resume", run_id, "--tracking-uri", uri, cwd=tmp_path, OMP_NUM_THREADS="1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    ckpts = tmp_path / "mlruns" / "checkpoints"
    _assert_identical(_final_state(ckpts / ref_id), _final_state(ckpts / run_id))
    ref_history, history = _history(uri, ref_id), _history(uri, run_id)
    assert ref_history.keys() == history.keys()
    for key in ref_history:
        assert history[key] == ref_history[key], f"{key}: logged values differ after the resume"
    assert len(history["train/loss_step"]) == 3 * STEPS_PER_EPOCH  # every step once
