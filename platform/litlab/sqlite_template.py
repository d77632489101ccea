"""A new SQLite tracking store starts as a copy of a store MLflow has already migrated.

MLflow builds a new SQLite store by running its whole history of schema migrations (alembic, 65
tables): 2.5 s on a quiet 2-core machine, up to 7 s on a busy one, paid by the first run in every new project directory,
by every `--tracking-uri sqlite:///...` naming a new file, and by every test. The template is
built once per MLflow version, by MLflow itself, in the user's cache
(`$LITLAB_CACHE_DIR`, else `$XDG_CACHE_HOME/litlab`, else `~/.cache/litlab`); copying it takes
0.1 s.

The one row of a fresh store that depends on where it was made, the Default experiment (id 0: its
artifact location follows the working directory, its creation time the clock), is deleted from
the template: MLflow recreates it on first opening the copy, as it would on a fresh store. If the
template is missing, unwritable or refused, the store is made the usual way.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
import uuid
from pathlib import Path


def cache_dir() -> Path:
    explicit = os.environ.get("LITLAB_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "litlab"


def template_path() -> Path:
    import mlflow

    return cache_dir() / f"mlflow-{mlflow.__version__}-store.db"


def _build(template: Path) -> None:
    """A store migrated by MLflow, less its Default experiment, written atomically."""
    from mlflow import MlflowClient

    partial = template.with_name(f"{template.name}.{uuid.uuid4().hex}.tmp")  # a new URI for MLflow
    try:
        MlflowClient(tracking_uri=f"sqlite:///{partial}").search_experiments(max_results=1)
        _forget_engine(partial)
        with sqlite3.connect(partial) as db:
            db.execute("DELETE FROM experiments WHERE experiment_id = 0")
        db.close()
        os.replace(partial, template)
    finally:
        partial.unlink(missing_ok=True)


def ensure_store(db: Path) -> None:
    """Make the SQLite store `db` ready for MLflow: a copy of the template if it does not exist,
    then opened once by MLflow (which migrates it if it is not a copy). Two processes doing this at
    once (two sweeps on a new store) would break MLflow's migration: one at a time."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{db}"
    with open(f"{db}.init-lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            seeded = not db.exists() and seed(db)
            try:
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            except Exception:
                if not seeded:
                    raise
                _discard(db)  # a template from a damaged cache (MLflow or SQLite refused it): both made afresh
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def seed(db: Path) -> bool:
    """Put a copy of the template at `db` (which does not exist yet); False if there is none to
    copy (then MLflow makes the store the usual way: seeding only saves time, so no failure of it
    is the user's)."""
    partial = db.with_name(f"{db.name}.{os.getpid()}.tmp")
    try:
        template = template_path()
        template.parent.mkdir(parents=True, exist_ok=True)
        with open(template.with_name(template.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process builds it; the others wait, then copy
            if not _sound(template):
                _build(template)
        shutil.copyfile(template, partial)
        os.replace(partial, db)
        return True
    except Exception:  # an unwritable cache, a full disk, MLflow failing to migrate the template
        partial.unlink(missing_ok=True)
        return False


def _sound(template: Path) -> bool:
    """A readable SQLite file holding a migrated schema (a damaged cache is rebuilt, not copied)."""
    if not template.exists():
        return False
    try:
        with sqlite3.connect(f"file:{template}?mode=ro", uri=True) as db:
            sound = (db.execute("PRAGMA quick_check").fetchone() == ("ok",)
                     and len(db.execute("SELECT version_num FROM alembic_version").fetchall()) == 1)
        db.close()
        return sound
    except sqlite3.Error:
        return False


def _forget_engine(db: Path) -> None:
    """MLflow keeps one engine per store URI, whose pooled connections hold the file open: one for a
    file about to be renamed or removed is closed."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(f"sqlite:///{db}", None)
    if engine is not None:
        engine.dispose()


def _discard(db: Path) -> None:
    """Remove a seeded store MLflow refused, and the template it came from."""
    _forget_engine(db)
    db.unlink(missing_ok=True)
    try:
        template_path().unlink(missing_ok=True)
    except OSError:
        pass
