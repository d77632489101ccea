"""The throwaway PostgreSQL server of tests/postgres.py: reachable with the password over TCP,
usable as Optuna storage from two storage objects, gone after the context exits."""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path

import pytest

from postgres import postgres_server


def test_sqlalchemy_connects_with_password(postgres_url):
    import sqlalchemy as sa

    assert postgres_url.startswith("postgresql+psycopg2://")
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select current_user")).scalar() == "litlab"
            assert conn.execute(sa.text("select current_database()")).scalar() == "litlab"
            assert conn.execute(sa.text("select 1 + 1")).scalar() == 2
    finally:
        engine.dispose()
    # The password is really checked (scram over TCP, not trust).
    bad = sa.create_engine(postgres_url.replace(":litlab-test-pw@", ":wrong@"))
    with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
        bad.connect()
    bad.dispose()


def test_optuna_study_round_trip(postgres_url):
    import optuna
    from optuna.storages import RDBStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="fixture-check", storage=postgres_url, direction="minimize")
    trial = study.ask()
    x = trial.suggest_float("optim.lr", 1e-4, 1e-1, log=True)
    study.tell(trial, (x - 0.01) ** 2)
    study.enqueue_trial({"optim.lr": 0.05})  # a WAITING trial is stored too

    # A second, independent storage object (its own engine and connections) sees the same study.
    other = RDBStorage(postgres_url)
    try:
        again = optuna.load_study(study_name="fixture-check", storage=other)
        states = [t.state for t in again.get_trials(deepcopy=False)]
        assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING]
        assert again.best_trial.params == {"optim.lr": x}
        assert again.best_value == pytest.approx((x - 0.01) ** 2)
    finally:
        other.engine.dispose()


def test_server_starts_fast_and_is_removed_after(postgres_url, capsys):
    """A second, private server: how long a start takes, and that nothing is left behind.
    (postgres_url only to skip, or fail under CI, the same way where PostgreSQL is absent.)"""
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("litlab-pg-*"))  # the session fixture's server may be up: not ours
    t0 = time.perf_counter()
    with postgres_server() as url:
        started = time.perf_counter() - t0
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        ours = set(tmp.glob("litlab-pg-*")) - before
    total = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\npostgres fixture: up in {started:.2f}s, up+down in {total:.2f}s")
    assert started < 30
    assert len(ours) == 1 and not next(iter(ours)).exists(), "temp cluster dir left behind"
    with socket.socket() as s:  # stopped: nothing listens on its port any more
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_body_error_still_stops_and_removes(postgres_url):
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("litlab-pg-*"))
    with pytest.raises(KeyError), postgres_server() as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        raise KeyError("the test body fails")
    assert set(tmp.glob("litlab-pg-*")) == before
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
