"""End-to-end sweeps on tiny budgets: pruning, MLflow parent/child runs, resume after a kill,
parallel workers, and --show. (PostgreSQL and DDP trials: test_sweep_distributed.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from helpers import MLP_DIGITS, cli_env, litlab_cmd, run_cli, run_cli_tail
from litlab.cli import main
from litlab.sweep import driver

TINY = ["model.hidden=[16]", "trainer.max_epochs=3", "tracking.system_metrics=false", "data.batch_size=128"]


def write_sweep(tmp_path, **changes) -> str:
    spec = {
        "name": "tiny",
        "experiment": str(MLP_DIGITS),
        "overrides": list(TINY),
        "metric": "val/acc",
        "direction": "maximize",
        "n_trials": 6,
        "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        "heartbeat_interval": 0.5,
        "grace_period": 4,
        "space": {
            "optim.lr": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True},
            "optim.name": {"type": "categorical", "choices": ["adam", "sgd"]},
            "optim.momentum": {"type": "float", "low": 0.5, "high": 0.95, "when": {"optim.name": "sgd"}},
        },
    }
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def storage_of(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlruns/optuna.db"


def children_of(uri: str, parent: str):
    c = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    return [r for r in c.search_runs(exps) if r.data.tags.get("mlflow.parentRunId") == parent]


@pytest.mark.slow
def test_sweep_prunes_and_tracks_one_parent_and_a_child_per_trial(tmp_path, tracking_uri, capsys):
    result = driver.sweep(write_sweep(tmp_path), tracking_uri=tracking_uri, storage=storage_of(tmp_path))
    study = optuna.load_study(study_name="tiny", storage=storage_of(tmp_path))
    trials = study.get_trials()
    assert len(trials) == 6 and sorted(t.number for t in trials) == list(range(6))
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert any(t.state == TrialState.PRUNED for t in trials), "nothing was pruned"
    for t in trials:  # the conditional parameter exists exactly when its parent activates it
        assert ("optim.momentum" in t.params) == (t.params["optim.name"] == "sgd")

    c = MlflowClient(tracking_uri=tracking_uri)
    parent = c.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["litlab.sweep"] == "true"
    assert "best_value" in parent.data.metrics and parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    plots = {a.path for a in c.list_artifacts(result.parent_run_id, "plots")}
    assert {"plots/optimization_history.html", "plots/optimization_history.png"} <= plots, plots
    kids = children_of(tracking_uri, result.parent_run_id)
    assert len(kids) == 6
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in kids}
    for t in trials:
        run = by_number[t.number]
        assert run.data.tags["optuna.state"] == t.state.name
        assert run.info.status == "FINISHED"
        assert float(run.data.params["optim.lr"]) == pytest.approx(t.params["optim.lr"])
    out = capsys.readouterr().out
    assert "litlab run" in out and f"#{study.best_trial.number}" in out


@pytest.mark.slow
def test_resume_after_killing_the_sweep_mid_trial(tmp_path, tracking_uri):
    sweep = write_sweep(tmp_path, n_trials=4, pruner={"name": "none"},
                        overrides=TINY[:-1] + ["trainer.max_epochs=20", "data.batch_size=16"])
    args = ["sweep", sweep, "--storage", storage_of(tmp_path), "--tracking-uri", tracking_uri]
    proc = subprocess.Popen(litlab_cmd(*args), cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # kill once trial 1 is training
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name="tiny", storage=storage_of(tmp_path)).get_trials()
            except KeyError:
                continue
            if any(t.number == 1 and t.state == TrialState.RUNNING and "litlab.mlflow_run_id" in t.user_attrs
                   for t in trials):
                break
        os.killpg(proc.pid, signal.SIGKILL)  # driver, forkserver and trial process together
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed = optuna.load_study(study_name="tiny", storage=storage_of(tmp_path)).get_trials()
    assert any(t.state == TrialState.RUNNING for t in killed), "the sweep was not killed mid-trial"

    rerun = run_cli(*args, cwd=tmp_path, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = optuna.load_study(study_name="tiny", storage=storage_of(tmp_path)).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4, [(t.number, t.state.name, t.user_attrs.get("litlab.failed")) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all(t.user_attrs.get("litlab.failed") == "retried" for t in failed)
    c = MlflowClient(tracking_uri=tracking_uri)
    for t in failed:  # the killed trial's child run was ended, not left RUNNING forever
        assert c.get_run(t.user_attrs["litlab.mlflow_run_id"]).info.status == "FAILED"
    parents = {r.data.tags.get("mlflow.parentRunId") for r in children_of_all(tracking_uri)}
    assert len(parents) == 1  # the resumed sweep reused the same parent run


def children_of_all(uri):
    c = MlflowClient(tracking_uri=uri)
    return [r for r in c.search_runs([e.experiment_id for e in c.search_experiments()])
            if "mlflow.parentRunId" in r.data.tags]


def test_failing_heartbeats_say_so_once_and_say_when_they_recover(capsys):
    from litlab.sweep import storage as st

    study = optuna.create_study()
    trial = study.ask()
    real = study._storage.set_trial_user_attr
    outcomes = iter([True] + [False] * 5 + [True] * 1000)  # the first beat, 5 failed, then all get through
    beats = []

    def flaky(trial_id, key, value):
        if not next(outcomes):
            raise ConnectionError("server closed the connection unexpectedly")
        beats.append(value)
        real(trial_id, key, value)

    study._storage.set_trial_user_attr = flaky
    with st.Heartbeat(study, trial._trial_id, interval=0.01, number=7):
        deadline = time.time() + 10
        while len(beats) < 4 and time.time() < deadline:
            time.sleep(0.01)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "litlab sweep: trial 7: 3 heartbeats in a row failed (ConnectionError: server closed the connection "
        "unexpectedly); if the storage stays unreachable for grace_period, other sweep processes will fail and "
        "retry this trial",
        "litlab sweep: trial 7: heartbeats get through again (after 5 failed)"], lines
    assert study.trials[0].user_attrs[st.HEARTBEAT] == beats[-1]


def test_the_forkserver_starts_before_the_driver_imports_lightning(tmp_path):
    """The forkserver's preload (Lightning, MLflow, ...) runs beside the driver's own imports: a
    2-trial sweep on this 2-core machine reached its first result in 17 s instead of 25."""
    import sys

    code = ("import sys\nfrom multiprocessing import forkserver\n"
            "def spy():\n"
            "    print('lightning' in sys.modules, 'torch' in sys.modules, flush=True)\n"
            "    raise SystemExit(0)\n"
            "forkserver.ensure_running = spy\n"
            "from litlab.cli import main\n"
            f"main(['sweep', {write_sweep(tmp_path)!r}, '--storage', {storage_of(tmp_path)!r}])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "False"], proc.stdout  # neither imported when it starts
    assert not (tmp_path / "mlruns").exists()  # it stopped before touching a store


@pytest.mark.slow
def test_two_workers_run_trials_in_parallel_processes(tmp_path, tracking_uri):
    sweep = write_sweep(tmp_path, n_trials=4, pruner={"name": "none"},
                        overrides=TINY[:-1] + ["trainer.max_epochs=6", "data.batch_size=32"])
    driver.sweep(sweep, workers=2, tracking_uri=tracking_uri, storage=storage_of(tmp_path), quiet=True)
    trials = optuna.load_study(study_name="tiny", storage=storage_of(tmp_path)).get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    pids = {t.user_attrs["litlab.pid"] for t in trials}
    assert len(pids) == 4 and os.getpid() not in pids  # every trial in a process of its own
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1)), "trials never overlapped"


@pytest.mark.slow
def test_a_slow_trial_start_is_not_taken_for_a_dead_trial(tmp_path, tracking_uri):
    # A fresh `litlab sweep` process starts its forkserver (imports Lightning, MLflow, ...: seconds, far
    # more on a loaded machine) while its first trial already exists; the grace period here is shorter
    # than that. The driver answers for its live trial processes, so none is failed as stale.
    sweep = write_sweep(tmp_path, n_trials=3, pruner={"name": "none"}, heartbeat_interval=0.25, grace_period=1.5)
    code, out, tail = run_cli_tail("sweep", sweep, "--workers", "2", "--storage", storage_of(tmp_path),
                                   "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert code == 0, out[-3000:]
    trials = optuna.load_study(study_name="tiny", storage=storage_of(tmp_path)).get_trials()
    assert [(t.number, t.state.name, t.user_attrs.get("litlab.reason")) for t in trials] == [
        (i, "COMPLETE", None) for i in range(3)]
    # The output ends with the sweep: the forkserver, which shares it, froze its preloaded objects
    # (litlab.sweep.freeze), so its exit skips the final cycle search that took 4 s here.
    assert tail < 3.0, f"{tail:.1f} s from the report to the end of the output"


def test_show_and_bad_sweep_files(tmp_path, tracking_uri, capsys):
    sweep = write_sweep(tmp_path, n_trials=2, pruner={"name": "none"})
    assert main(["sweep", sweep, "--show", "--storage", storage_of(tmp_path)]) == 2  # no study yet
    assert "no study 'tiny'" in capsys.readouterr().err
    driver.sweep(sweep, tracking_uri=tracking_uri, storage=storage_of(tmp_path), quiet=True)
    assert main(["sweep", sweep, "--show", "--storage", storage_of(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2/2 done" in out and "litlab run" in out
    bad = write_sweep(tmp_path, space={"optim.lrr": {"type": "float", "low": 1e-4, "high": 1e-1}})
    assert main(["sweep", bad, "--storage", storage_of(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lrr" in err[0]


@pytest.mark.slow
def test_multi_objective_sweep(tmp_path, tracking_uri, capsys):
    sweep = write_sweep(tmp_path, n_trials=3, metric=["val/acc", "val/loss"], direction=["maximize", "minimize"],
                        sampler={"name": "nsga2", "seed": 0}, pruner={"name": "none"})
    result = driver.sweep(sweep, tracking_uri=tracking_uri, storage=storage_of(tmp_path))
    study = optuna.load_study(study_name="tiny", storage=storage_of(tmp_path))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(done) == 3 and all(len(t.values) == 2 for t in done)
    assert result.best_trials and {t.number for t in result.best_trials} <= {t.number for t in done}
    parent = MlflowClient(tracking_uri=tracking_uri).get_run(result.parent_run_id)
    assert parent.data.metrics["pareto_front_size"] == len(study.best_trials)
    out = capsys.readouterr().out
    assert "val/acc" in out and "val/loss" in out and "litlab run" in out


def test_journal_file_storage(tmp_path, tracking_uri):
    sweep = write_sweep(tmp_path, n_trials=2, pruner={"name": "none"}, sampler={"name": "cmaes", "seed": 0})
    journal = f"journal:{tmp_path}/study.log"
    driver.sweep(sweep, tracking_uri=tracking_uri, storage=journal, quiet=True)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(f"{tmp_path}/study.log")))
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2


def test_gpu_slots_pack_trials_onto_gpus():
    assert driver.gpu_slots(2, None, None) == [None, None]
    assert driver.gpu_slots(2, 2, [0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert driver.gpu_slots(3, 1, [4, 5, 6]) == [[4], [5], [6]]
    from litlab.errors import UserError

    with pytest.raises(UserError, match="4 GPUs, but 3 are visible"):
        driver.gpu_slots(2, 2, [0, 1, 2])


def test_sweep_eta_is_the_mean_trial_time_over_the_remaining_waves():
    from litlab.sweep.driver import sweep_eta

    assert sweep_eta([], 5, 1) is None  # nothing finished yet: no estimate
    assert sweep_eta([10.0, 20.0], 4, 1) == 60.0  # 4 more trials of 15 s, one at a time
    assert sweep_eta([10.0, 20.0], 4, 2) == 30.0  # two at a time: 2 waves
    assert sweep_eta([10.0], 3, 2) == 20.0  # 3 trials on 2 workers: 2 waves
