"""Scaling out: two `litlab sweep` processes sharing one PostgreSQL study, and DDP inside a trial."""

from __future__ import annotations

import subprocess

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from helpers import cli_env, litlab_cmd, run_cli
from test_sweep import TINY, write_sweep


@pytest.mark.slow
def test_two_sweep_processes_share_one_postgres_study(tmp_path, tracking_uri, postgres_url):
    sweep = write_sweep(tmp_path, n_trials=6, pruner={"name": "none"},
                        overrides=TINY[:-1] + ["trainer.max_epochs=4", "data.batch_size=32"])
    args = litlab_cmd("sweep", sweep, "--storage", postgres_url, "--tracking-uri", tracking_uri, "--study", "shared")
    procs = [subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="shared", storage=postgres_url).get_trials()
    assert sorted(t.number for t in trials) == list(range(6))  # n_trials in total, numbers unique
    assert all(t.state == TrialState.COMPLETE for t in trials)
    drivers = {t.user_attrs["litlab.driver"] for t in trials}
    assert len(drivers) == 2, f"only {drivers} contributed"
    parents = {r.data.tags["mlflow.parentRunId"] for r in children_of_any(tracking_uri)}
    assert len(parents) == 1  # both processes report under the study's one parent run


def test_sweeps_starting_at_once_on_a_new_database_all_open_it(postgres_url):
    """Optuna creates its tables on a new database: four processes doing it at once (threads here,
    each with its own connections) must all succeed, not fail on PostgreSQL's duplicate types."""
    import threading
    import uuid

    import sqlalchemy as sa

    from litlab.sweep.storage import open_storage

    schema = f"fresh_{uuid.uuid4().hex[:8]}"  # a new, empty namespace: as a new database to Optuna
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = f"{postgres_url}?options=-csearch_path%3D{schema}"
    start, errors = threading.Barrier(4), []

    def open_it():
        start.wait()
        try:
            open_storage(url)
        except Exception as e:  # noqa: BLE001 (collected, then asserted)
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    with engine.connect() as conn:
        tables = conn.execute(sa.text("SELECT count(*) FROM information_schema.tables WHERE table_schema = :s"),
                              {"s": schema}).scalar()
    assert tables > 5  # Optuna's tables, in the fresh schema


def children_of_any(uri):
    c = MlflowClient(tracking_uri=uri)
    return [r for r in c.search_runs([e.experiment_id for e in c.search_experiments()])
            if "mlflow.parentRunId" in r.data.tags]


@pytest.mark.slow
def test_ddp_trial_is_one_trial_and_one_child_run_and_prunes_on_every_rank(tmp_path, tracking_uri):
    # A grid of two learning rates: 3e-2 learns, 1e-6 does not and falls under the threshold -> pruned.
    sweep = write_sweep(
        tmp_path, n_trials=2, sampler={"name": "grid"}, pruner={"name": "threshold", "lower": 0.25},
        overrides=TINY + ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"],
        space={"optim.lr": {"type": "categorical", "choices": [3e-2, 1e-6]}})
    proc = run_cli("sweep", sweep, "--storage", f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri", tracking_uri,
                   cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.get_trials()
    assert len(trials) == 2
    states = {t.params["optim.lr"]: t.state for t in trials}
    assert states == {3e-2: TrialState.COMPLETE, 1e-6: TrialState.PRUNED}
    c = MlflowClient(tracking_uri=tracking_uri)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert len(runs) == 3  # one parent + one child per trial, not one per rank
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(kids) == 2 and all("x2" in r.data.tags["device"] for r in kids)
    assert not [r for r in runs if r.info.status == "RUNNING"]
