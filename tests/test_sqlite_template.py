"""A new SQLite store is a copy of a template MLflow migrated once, and is the store MLflow would
have made: same schema, same rows, the Default experiment where MLflow puts it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import mlflow.store.db.utils as db_utils
import pytest
from mlflow import MlflowClient

from litlab import sqlite_template, tracking


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LITLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "cache"


def _clauses(sql: str | None) -> list[str]:
    """A CREATE statement as its sorted clauses: MLflow's migrations order a table's constraints
    differently from one run to the next."""
    return sorted(line.strip().rstrip(",").strip() for line in (sql or "").splitlines())


def _contents(db: Path) -> tuple[list, dict]:
    """(schema, rows of every table), the creation times of the Default experiment left out."""
    with sqlite3.connect(db) as c:
        schema = sorted((kind, name, _clauses(sql)) for kind, name, sql in
                        c.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))
        tables = [t for (t,) in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = {t: sorted(c.execute(f"SELECT * FROM {t}"), key=repr) for t in tables}
        rows["experiments"] = sorted(c.execute("SELECT experiment_id, name, artifact_location, lifecycle_stage, "
                                               "workspace FROM experiments"))
    return schema, rows


def test_a_new_store_is_the_store_mlflow_would_make(cache, tmp_path):
    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'migrated.db'}").search_experiments()  # MLflow alone
    tracking.client(f"sqlite:///{tmp_path / 'seeded.db'}").search_experiments()
    template = sqlite_template.template_path()
    assert template.parent == cache and template.exists()
    schema, rows = _contents(tmp_path / "seeded.db")
    assert (schema, rows) == _contents(tmp_path / "migrated.db")
    assert len(schema) > 60 and rows["alembic_version"] and rows["workspaces"]
    assert rows["experiments"] == [(0, "Default", str(tmp_path / "mlruns" / "0"), "active", "default")]
    with sqlite3.connect(template) as c:  # the place-dependent row is made by MLflow on each copy
        assert c.execute("SELECT COUNT(*) FROM experiments").fetchone() == (0,)


def test_the_next_new_store_is_copied_not_migrated(cache, tmp_path, monkeypatch):
    tracking.client(f"sqlite:///{tmp_path / 'first.db'}")  # builds the template

    def no_migration(*args, **kwargs):
        raise AssertionError("MLflow migrated a new store")

    monkeypatch.setattr(db_utils, "_initialize_tables", no_migration)
    c = tracking.client(f"sqlite:///{tmp_path / 'second.db'}")
    run = c.create_run(tracking.get_or_create_experiment(c, f"sqlite:///{tmp_path / 'second.db'}", "exp"))
    c.log_metric(run.info.run_id, "loss", 0.5, step=1)
    assert [m.value for m in c.get_metric_history(run.info.run_id, "loss")] == [0.5]


def test_a_damaged_template_is_rebuilt(cache, tmp_path):
    tracking.client(f"sqlite:///{tmp_path / 'first.db'}")
    template = sqlite_template.template_path()
    template.write_bytes(b"not a database" * 100)
    c = tracking.client(f"sqlite:///{tmp_path / 'second.db'}")
    assert [e.name for e in c.search_experiments()] == ["Default"]
    with sqlite3.connect(template) as db:
        assert db.execute("SELECT COUNT(*) FROM alembic_version").fetchone() == (1,)
    assert not list(cache.glob("*.tmp"))


def test_a_template_mlflow_refuses_gives_way_to_a_migrated_store(cache, tmp_path):
    """A sound SQLite file MLflow cannot use (another schema under this MLflow's version)."""
    template = sqlite_template.template_path()
    template.parent.mkdir(parents=True)
    with sqlite3.connect(template) as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        db.execute("INSERT INTO alembic_version VALUES ('0123456789ab')")
    c = tracking.client(f"sqlite:///{tmp_path / 'store.db'}")
    run = c.create_run(tracking.get_or_create_experiment(c, f"sqlite:///{tmp_path / 'store.db'}", "exp"))
    assert c.get_run(run.info.run_id).info.status == "RUNNING"
    assert not template.exists()  # the next new store builds a sound one


def test_without_a_usable_cache_the_store_is_made_the_usual_way(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LITLAB_CACHE_DIR", str(tmp_path / "file" / "cache"))  # cannot be a directory
    assert not sqlite_template.seed(tmp_path / "store.db")
    assert not list(tmp_path.glob("store.db*"))
    c = tracking.client(f"sqlite:///{tmp_path / 'store.db'}")
    assert [e.name for e in c.search_experiments()] == ["Default"]


def test_an_existing_store_is_never_replaced(cache, tmp_path):
    uri = f"sqlite:///{tmp_path / 'kept.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("mine")
    tracking._ready.discard(uri)
    c = tracking.client(uri)
    assert sorted(e.name for e in c.search_experiments()) == ["Default", "mine"]
