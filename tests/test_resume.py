"""`litlab resume` continues the SAME MLflow run: same id, steps continue, no duplicate steps,
also after the training process was SIGKILLed mid-run."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from lightning import Callback
from mlflow import MlflowClient

from helpers import MLP_DIGITS, QUICK, cli_env, litlab_cmd, metric_steps, run_cli_heavy_imports
from litlab import runner
from litlab.cli import main
from litlab.errors import UserError


def _assert_no_duplicate_steps(uri, run_id):
    for key, steps in metric_steps(uri, run_id).items():
        if key.startswith("system/"):
            continue
        assert len(steps) == len(set(steps)), f"{key} has duplicate steps: {sorted(steps)}"


def test_resume_extends_the_same_run(tracking_uri):
    first = runner.run(MLP_DIGITS, QUICK, tracking_uri=tracking_uri)
    steps_before = metric_steps(tracking_uri, first.run_id)
    second = runner.resume(first.run_id, ["trainer.max_epochs=4"], tracking_uri=tracking_uri)
    assert second.run_id == first.run_id
    run = MlflowClient(tracking_uri=tracking_uri).get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["litlab.resumes"] == "1"
    steps = metric_steps(tracking_uri, first.run_id)
    assert len(steps["val/acc"]) == 4  # epochs 0..3, two from each segment
    assert sorted(steps["val/acc"]) == sorted(set(steps["val/acc"]))
    assert max(steps["train/loss_step"]) > max(steps_before["train/loss_step"])  # steps continue
    _assert_no_duplicate_steps(tracking_uri, first.run_id)
    # the cosine schedule (mlp_digits.yaml: lr 3e-3 to 0) is the 4-epoch run's: at the resumed epochs'
    # starts (logged there) the rate is lr(t) = 3e-3 * (1 + cos(pi t / T)) / 2 with T = 4 epochs,
    # not the 2-epoch schedule's end (0: the extra epochs trained nothing)
    lr_key = next(k for k in run.data.metrics if k.startswith("lr-"))
    history = {m.step: m.value for m in MlflowClient(tracking_uri=tracking_uri).get_metric_history(first.run_id, lr_key)}
    per_epoch = min(steps_before["val/acc"]) + 1
    for epoch in (2, 3):
        t = epoch * per_epoch
        assert history[t] == pytest.approx(3e-3 * (1 + math.cos(math.pi * t / (4 * per_epoch))) / 2), history


def test_resume_needs_epochs_left_and_leaves_a_finished_run_as_it_was(tracking_uri):
    first = runner.run(MLP_DIGITS, QUICK + ["tracking.system_metrics=false"], tracking_uri=tracking_uri)
    for epochs in (1, 2):
        with pytest.raises(UserError, match=f"trainer.max_epochs: run {first.run_id} has trained 2 epochs already; "
                                            "give more than 2 to train it further"):
            runner.resume(first.run_id, [f"trainer.max_epochs={epochs}"], tracking_uri=tracking_uri)
    assert MlflowClient(tracking_uri=tracking_uri).get_run(first.run_id).info.status == "FINISHED"


def test_resume_refuses_model_changes(tracking_uri, tmp_path):
    first = runner.run(MLP_DIGITS, QUICK + ["trainer.max_epochs=1", "tracking.system_metrics=false"],
                       tracking_uri=tracking_uri)
    with pytest.raises(UserError, match="config hash"):
        runner.resume(first.run_id, ["model.hidden=[64]"], tracking_uri=tracking_uri)
    # a misspelt override: told from the config in the run's last.ckpt, before Lightning's import
    status, imported, stderr = run_cli_heavy_imports("resume", "--tracking-uri", tracking_uri, first.run_id,
                                                     "trainer.max_epoch=3", cwd=tmp_path)
    assert (status, imported) == (2, ["torch"]), stderr
    assert stderr.startswith("litlab resume: error: trainer.max_epoch: unknown key (did you mean 'max_epochs'?)"), stderr


def test_last_checkpoint_is_written_at_every_epoch_end(tracking_uri):
    """Without every_n_train_steps, last.ckpt is there from the first epoch's end on, holding the
    epoch just ended: a run killed at any later point resumes from it (Lightning 2.6's own
    ModelCheckpoint wrote it only when the fit ended)."""
    seen = []

    class LastAtEpochStart(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            last = Path(trainer.default_root_dir) / "last.ckpt"
            seen.append(torch.load(last, weights_only=False)["epoch"] if last.exists() else None)

    runner.run(MLP_DIGITS, QUICK + ["trainer.max_epochs=4", "tracking.system_metrics=false"],
               tracking_uri=tracking_uri, callbacks=[LastAtEpochStart()])
    assert seen == [None, 0, 1, 2]


@pytest.mark.slow
def test_resume_after_sigkill_mid_run(tracking_uri, tmp_path):
    epochs = 20
    cmd = litlab_cmd("run", str(MLP_DIGITS), "--tracking-uri", tracking_uri, *QUICK,
                     f"trainer.max_epochs={epochs}", "data.batch_size=8")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    run_id = None
    try:
        for line in proc.stderr:  # the run id is printed before training starts
            if line.startswith("litlab: started run "):
                run_id = line.split()[3]
                break
        assert run_id, "no run id printed"
        last = tmp_path / "mlruns" / "checkpoints" / run_id / "last.ckpt"
        deadline = time.time() + 120
        while not last.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert last.exists() and proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.1)  # now in the middle of a later epoch
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_after = torch.load(last, weights_only=False, map_location="cpu")["epoch"]
    assert killed_after < epochs - 1, "killed after the fit, not in it"
    c = MlflowClient(tracking_uri=tracking_uri)
    assert c.get_run(run_id).info.status == "RUNNING"  # SIGKILL leaves it so; resume takes it over

    result = runner.resume(run_id, tracking_uri=tracking_uri)
    assert result.run_id == run_id and result.status == "FINISHED"
    assert c.get_run(run_id).info.status == "FINISHED"
    steps = metric_steps(tracking_uri, run_id)
    assert len(steps["val/acc"]) == epochs, sorted(steps["val/acc"])  # every epoch once: no gap, no duplicate
    _assert_no_duplicate_steps(tracking_uri, run_id)
    assert "test/acc" in result.metrics


@pytest.mark.slow
@pytest.mark.parametrize("signalled, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_run_says_so_exits_with_the_signals_status_and_resumes(signalled, status, tracking_uri, tmp_path):
    """Ctrl+C (Lightning turned it into exit 1) and SIGTERM (exit 0, as if it had ended well): the
    shell's statuses, one line with the resume command, the run KILLED; the resume clears the reason."""
    cmd = litlab_cmd("run", str(MLP_DIGITS), "--tracking-uri", tracking_uri, *QUICK, "trainer.max_epochs=400",
                     "tracking.system_metrics=false")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        run_id = next(line.split()[3] for line in proc.stderr if line.startswith("litlab: started run "))
        last = tmp_path / "mlruns" / "checkpoints" / run_id / "last.ckpt"
        deadline = time.time() + 120
        while not last.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signalled)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == status, rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    how = "interrupted (Ctrl+C)" if signalled == signal.SIGINT else "stopped by SIGTERM"
    assert rest.strip().splitlines()[-1] == (f"litlab run: {how}; run {run_id} is KILLED: continue it with "
                                             f"`litlab resume {run_id}`"), rest
    assert "Traceback" not in rest
    c = MlflowClient(tracking_uri=tracking_uri)
    assert c.get_run(run_id).info.status == "KILLED"
    more = "trainer.max_epochs=" + str(torch.load(last, weights_only=False)["epoch"] + 2)
    assert main(["resume", run_id, "--tracking-uri", tracking_uri, more]) == 0
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and "litlab.failure_reason" not in run.data.tags


def test_a_sweeps_parent_run_is_not_resumed_but_pointed_to_its_sweep(tracking_uri, capsys):
    c = MlflowClient(tracking_uri=tracking_uri)
    parent = c.create_run(c.create_experiment("sweep_exp"), tags={
        "litlab.sweep": "true", "optuna.study": "mlp_digits_sweep", "litlab.sweep_file": "sweeps/mlp_digits.yaml"})
    c.set_terminated(parent.info.run_id)
    capsys.readouterr()  # MLflow's log of making the store
    line = (f"run {parent.info.run_id} is the parent run of sweep mlp_digits_sweep, not a training run: continue the "
            "sweep by running `litlab sweep sweeps/mlp_digits.yaml` again, or resume one of its trials")
    assert main(["resume", parent.info.run_id, "--tracking-uri", tracking_uri]) == 2
    assert capsys.readouterr().err.splitlines() == [f"litlab resume: error: {line}"]
    with pytest.raises(UserError, match="is the parent run of sweep mlp_digits_sweep"):
        runner.resume(parent.info.run_id, tracking_uri=tracking_uri)
