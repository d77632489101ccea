"""Stopping and rerunning a sweep: Ctrl+C and SIGTERM end it cleanly (one line, 130 / 143, trials
retried by the next run, no run left RUNNING); a study refuses a rerun that would mix other trials
in; --show totals the n_trials the study was run with; a metric the model never logs stops the
sweep after its first trial; a bad --storage is one line."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from helpers import cli_env, litlab_cmd
from litlab.cli import main
from litlab.runner import load_config
from litlab.sweep import definition, driver
from litlab.sweep import storage as st
from litlab.sweep.spec import load_spec, objective_overrides
from test_sweep import TINY, storage_of, write_sweep

optuna.logging.set_verbosity(optuna.logging.WARNING)
SLOW_TRIALS = dict(n_trials=3, pruner={"name": "none"}, overrides=TINY[:-1] + ["trainer.max_epochs=5000", "data.batch_size=16"])


# ------------------------------------------------------------------------------- Ctrl+C and SIGTERM
def _start(tmp_path, tracking_uri) -> tuple[subprocess.Popen, list[str], Path]:
    args = ["sweep", write_sweep(tmp_path, **SLOW_TRIALS), "--storage", storage_of(tmp_path), "--tracking-uri",
            tracking_uri]
    err = tmp_path / "stderr.txt"
    proc = subprocess.Popen(litlab_cmd(*args), cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=err.open("w"), start_new_session=True)
    return proc, args, err


def _trials(tmp_path):
    try:
        return optuna.load_study(study_name="tiny", storage=storage_of(tmp_path)).get_trials()
    except KeyError:
        return []


def _when_trial_0_trains(tmp_path, proc) -> optuna.trial.FrozenTrial:
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        started = [t for t in _trials(tmp_path) if t.number == 0 and "litlab.mlflow_run_id" in t.user_attrs]
        if started:
            return started[0]
    raise AssertionError(f"trial 0 never started training (exit status {proc.poll()})")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _stopped(proc, err: Path) -> tuple[int, list[str]]:
    try:
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, err.read_text().splitlines()


def _assert_cleaned_up(tmp_path, tracking_uri, trial0) -> None:
    trials = _trials(tmp_path)
    first = next(t for t in trials if t.number == 0)
    assert first.state == TrialState.FAIL and first.user_attrs[st.FAILED] == "retried", first.user_attrs
    retry = [t for t in trials if t.state == TrialState.WAITING]  # what the same command runs first
    assert len(retry) == 1 and retry[0].system_attrs["fixed_params"] == first.params
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    c = MlflowClient(tracking_uri=tracking_uri)
    child = c.get_run(trial0.user_attrs["litlab.mlflow_run_id"])
    assert child.info.status == "KILLED"
    parent = c.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    assert not _alive(trial0.user_attrs["litlab.pid"])  # no trial trains on after its sweep


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_status_130(tmp_path, tracking_uri):
    proc, _, err = _start(tmp_path, tracking_uri)
    trial0 = _when_trial_0_trains(tmp_path, proc)
    os.killpg(proc.pid, signal.SIGINT)  # as the terminal does: the driver and its trials at once
    code, lines = _stopped(proc, err)
    assert code == 130, lines
    assert lines[1:] == ["litlab sweep: interrupted (Ctrl+C); stopping the running trials; rerun the same "
                         "command to continue"], lines  # after the study's line: no traceback, no second line
    _assert_cleaned_up(tmp_path, tracking_uri, trial0)


@pytest.mark.slow
def test_sigterm_to_the_driver_alone_stops_its_trials_too(tmp_path, tracking_uri):
    proc, _, err = _start(tmp_path, tracking_uri)
    trial0 = _when_trial_0_trains(tmp_path, proc)
    os.kill(proc.pid, signal.SIGTERM)  # `kill PID`: the trial process gets nothing from outside
    code, lines = _stopped(proc, err)
    assert code == 143, lines
    assert lines[1:] == ["litlab sweep: stopped by SIGTERM; stopping the running trials; rerun the same command "
                         "to continue"], lines
    _assert_cleaned_up(tmp_path, tracking_uri, trial0)


def test_a_trial_stops_between_batches_once_fit_has_started(monkeypatch):
    # Raised inside torch.save (a checkpoint), the KeyboardInterrupt came out as torch's RuntimeError:
    # the trial FAILed as a crash, with a traceback, instead of being retried.
    from litlab.sweep import trial

    monkeypatch.setattr(trial, "_stopping", [])
    monkeypatch.setattr(trial, "_between_batches", [False])
    with pytest.raises(KeyboardInterrupt):  # before fit: at once
        trial._on_stop_signal(signal.SIGTERM, None)
    trial._on_stop_signal(signal.SIGINT, None)  # a second signal: ignored
    assert trial._stopping == [signal.SIGTERM]

    monkeypatch.setattr(trial, "_stopping", [])
    trial.TrialReporter(None, ["val/acc"], ["maximize"], prune=False).on_fit_start(None, None)
    trial._on_stop_signal(signal.SIGINT, None)  # during fit: nothing raised here ...
    with pytest.raises(KeyboardInterrupt):  # ... but at the end of the batch
        trial.TrialReporter(None, ["val/acc"], ["maximize"], prune=False).on_train_batch_end(None, None, None, None, 0)


def test_the_driver_holds_a_stop_while_it_starts_a_trial():
    from litlab.sweep.stopping import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        with pytest.raises(KeyboardInterrupt):
            with stop.deferred():  # asking Optuna for a trial and starting its process
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                started = True  # not cut short: the trial has its process
        assert started and stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # the cleanup is not cut short either
        time.sleep(0.2)
    assert signal.getsignal(signal.SIGTERM) is before


def _forkserver_of(pid: int) -> int | None:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"forkserver" in cmdline:
            return int(stat.parent.name)
    return None


def test_ctrl_c_while_the_trials_forkserver_imports_shows_no_traceback(tmp_path, tracking_uri):
    # The forkserver (in the terminal's process group) imports Lightning, MLflow, ... for seconds
    # before multiprocessing shields it from Ctrl+C: it printed a KeyboardInterrupt traceback.
    proc, _, err = _start(tmp_path, tracking_uri)
    deadline, server = time.time() + 60, None
    while server is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        server = _forkserver_of(proc.pid)
    assert server is not None, err.read_text()
    while not _imports_torch(server) and time.time() < deadline:  # deep in its imports
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    code, _ = _stopped(proc, err)
    deadline = time.time() + 10
    while _alive(server) and time.time() < deadline:  # what it writes, it has written by its end
        time.sleep(0.1)
    assert not _alive(server)  # it does not import on for seconds after the sweep has ended
    lines = err.read_text().splitlines()
    assert code == 130, lines
    assert "Traceback" not in "\n".join(lines) and "KeyboardInterrupt" not in "\n".join(lines), lines
    assert lines == ["litlab sweep: interrupted (Ctrl+C); rerun the same command to continue"], lines


def _imports_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# ------------------------------------------------------------------------------- the study's definition
def _open(tmp_path, sweep: str, cli: list[str] | None = None) -> optuna.Study:
    spec = load_spec(sweep, cli, classes=False)
    base = load_config(spec.experiment, [*spec.overrides, *objective_overrides(spec)])
    return driver.open_study(spec, storage_of(tmp_path), "tiny", definition.definition(spec, base.to_dict()))


def _done_trial(value: float = 0.9, **kw) -> optuna.trial.FrozenTrial:
    return create_trial(params={"optim.lr": 1e-3, "optim.name": "adam"}, value=value,
                        distributions={"optim.lr": FloatDistribution(1e-5, 3e-2, log=True),
                                       "optim.name": CategoricalDistribution(["adam", "sgd"])}, **kw)


def test_a_rerun_that_would_mix_other_trials_in_is_refused_in_one_line(tmp_path, tracking_uri, capsys):
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    sweep = write_sweep(tmp_path)
    _open(tmp_path, sweep).add_trial(_done_trial())
    _open(tmp_path, sweep, ["n_trials=9", "sampler.seed=3"])  # run-time settings may change
    for cli, told in [(["overrides.trainer.max_epochs=8"], "trainer.max_epochs is 3 in the study, 8 here"),
                      (["metric=val/loss"], "metric is 'val/acc' in the study, 'val/loss' here"),
                      (["space.optim.lr.high=0.5"], "space.optim.lr.high is 0.03 in the study, 0.5 here")]:
        args = ["sweep", sweep, *cli, "--storage", storage_of(tmp_path), "--tracking-uri", tracking_uri]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and told in err[0] and "--study NAME" in err[0], err
    study = optuna.load_study(study_name="tiny", storage=storage_of(tmp_path))
    assert len(study.trials) == 1  # nothing ran


def test_a_study_made_before_definitions_were_recorded_still_resumes(tmp_path):
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    old = optuna.create_study(study_name="tiny", storage=storage_of(tmp_path), direction="maximize")
    old.add_trial(_done_trial())
    study = _open(tmp_path, write_sweep(tmp_path))  # no error: nothing recorded to compare with
    recorded = study.user_attrs[definition.DEFINITION]
    assert recorded["metric"] == ["val/acc"] and recorded["config"]["trainer.max_epochs"] == 3
    with pytest.raises(Exception, match="trainer.max_epochs is 3 in the study, 5 here"):  # checked from now on
        _open(tmp_path, write_sweep(tmp_path), ["overrides.trainer.max_epochs=5"])


def test_a_study_whose_trials_all_showed_an_unlogged_metric_takes_the_fixed_one(tmp_path):
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    sweep = write_sweep(tmp_path)
    _open(tmp_path, sweep, ["metric=val/accc"]).add_trial(
        _done_trial(state=TrialState.FAIL, value=None, user_attrs={st.FAILED: st.UNLOGGED}))
    study = _open(tmp_path, sweep)  # the metric fixed: nothing ran with the misspelt one
    assert study.user_attrs[definition.DEFINITION]["metric"] == ["val/acc"]
    assert st.budget(study, 6).used == 0


def test_show_totals_the_n_trials_the_study_was_run_with(tmp_path, capsys):
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    sweep = write_sweep(tmp_path)  # n_trials: 6 in the file
    study = _open(tmp_path, sweep, ["n_trials=2"])
    for v in (0.8, 0.9):
        study.add_trial(_done_trial(v))
    assert main(["sweep", sweep, "--show", "--storage", storage_of(tmp_path)]) == 0
    assert "2/2 done" in capsys.readouterr().out
    assert main(["sweep", sweep, "n_trials=4", "--show", "--storage", storage_of(tmp_path)]) == 0
    assert "2/4 done" in capsys.readouterr().out


# ------------------------------------------------------------------------------- a metric never logged
@pytest.mark.slow
def test_a_metric_the_model_never_logs_stops_the_sweep_after_one_trial(tmp_path, tracking_uri, capfd):
    sweep = write_sweep(tmp_path, n_trials=3, pruner={"name": "none"}, metric="val/accc")
    args = ["sweep", sweep, "--storage", storage_of(tmp_path), "--tracking-uri", tracking_uri]
    assert main(args) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("litlab sweep: error: metric: 'val/accc' is not a metric this model logs (did you "
                              "mean 'val/acc'?); it logs: "), err
    assert "val/loss" in err[-1] and len(err) == 2 and "Traceback" not in "\n".join(err), err
    trials = _trials(tmp_path)
    assert [(t.state, t.user_attrs.get(st.FAILED)) for t in trials] == [(TrialState.FAIL, st.UNLOGGED)]
    runs = MlflowClient(tracking_uri=tracking_uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=tracking_uri).search_experiments()])
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]

    result = driver.sweep(write_sweep(tmp_path, n_trials=1, pruner={"name": "none"}), tracking_uri=tracking_uri,
                          storage=storage_of(tmp_path), quiet=True)  # fixed, the same study goes on
    assert result.budget.done == 1 and [t.state for t in _trials(tmp_path)][-1] == TrialState.COMPLETE


# ------------------------------------------------------------------------------- storage
@pytest.mark.parametrize("url", ["sqlite:////proc/nope/x.db", "journal:/proc/nope/x.log"])
def test_a_storage_that_cannot_be_created_is_one_line(tmp_path, tracking_uri, capsys, url):
    assert main(["sweep", write_sweep(tmp_path), "--storage", url, "--tracking-uri", tracking_uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"litlab sweep: error: --storage: cannot use {url}: cannot create the directory /proc/nope "
                   "(No such file or directory)"], err
