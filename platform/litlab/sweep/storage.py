"""Optuna storage by URL, the budget lock, heartbeats and stale trials.

URLs: `sqlite:///mlruns/optuna.db` (default), `journal:PATH` (Optuna's journal file), or any
SQLAlchemy RDB URL (`postgresql+psycopg2://...`, `mysql+pymysql://...`). Several `litlab sweep`
processes, on one machine or many, may share a study.

The budget lock makes "n_trials in total" exact across processes: the check "is there budget
left?" and the `study.ask()` that takes it happen under one lock (a file lock for SQLite and journal
files, an advisory lock for PostgreSQL and MySQL).

Heartbeats are litlab's own (a trial user attribute), so they work on every storage, the journal
file included. Two beat for a trial: its own process, and the driver that started it, for as long
as that process lives (it covers the seconds before the trial process can beat itself). A RUNNING
trial whose heartbeat is older than the grace period is failed and, up to max_retries, re-enqueued
with the same params.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import optuna
from optuna.trial import TrialState

from litlab.errors import UserError

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
HEARTBEAT = "litlab.heartbeat"  # user attr: unix time of the trial process's last beat
FAILED = "litlab.failed"  # user attr: "retried" | "died" | "error: ..." | UNLOGGED
UNLOGGED = "metric not logged"  # a trial that showed the sweep's metric is never logged: not counted
RETRIES = "litlab.retries"


def resolve_storage_url(url: str | None) -> str:
    url = url or DEFAULT_STORAGE
    for scheme in ("sqlite:///", "journal:"):
        if url.startswith(scheme):
            path = Path(url[len(scheme):].removeprefix("//") if scheme == "journal:" else url[len(scheme):])
            path = path if path.is_absolute() else Path.cwd() / path
            _make_parent(url, path)
            return f"{scheme}{path}"
    if "://" not in url:
        raise UserError(f"--storage: {url!r} is not a storage URL; use sqlite:///FILE, journal:FILE or an RDB URL "
                        "such as postgresql+psycopg2://user:pass@host/db")
    return url


def _make_parent(url: str, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--storage: cannot use {url}: cannot create the directory {path.parent} "
                        f"({e.strerror or type(e).__name__})") from None
    if path.is_dir():
        raise UserError(f"--storage: cannot use {url}: {path} is a directory; name a file in it")


def redact(url: str) -> str:
    """The URL without its password (for tags and messages)."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def open_storage(url: str) -> optuna.storages.BaseStorage:
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(url[len("journal:"):]))
        kwargs = {} if url.startswith("sqlite") else {"pool_pre_ping": True}
        # Optuna creates its tables on a new database; two sweeps starting at once there both did,
        # and PostgreSQL refused the second (duplicate key in pg_type): one at a time.
        with budget_lock(url, "litlab: create Optuna's tables"):
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except (ImportError, ModuleNotFoundError) as e:
        raise UserError(f"--storage: {redact(url)} needs a driver that is not installed ({e}); "
                        "for PostgreSQL: pip install 'litlab[postgres]'") from None
    except Exception as e:  # bad host, refused connection, bad credentials ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--storage: cannot open {redact(url)}: {first}") from None


# ------------------------------------------------------------------------------- the budget lock
@functools.lru_cache(maxsize=None)
def _engine(url: str):
    import sqlalchemy

    return sqlalchemy.create_engine(url, pool_pre_ping=True)


@contextlib.contextmanager
def budget_lock(url: str, study_name: str):
    """Mutual exclusion between every process using this storage, wherever it runs: per study
    name on PostgreSQL and MySQL (advisory locks), one lock per database file otherwise."""
    key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
    if url.startswith(("sqlite:///", "journal:")):
        target = url[len("sqlite:///"):] if url.startswith("sqlite") else url[len("journal:"):]
        with open(f"{target}.litlab-lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    import sqlalchemy

    dialect = url.split(":", 1)[0].split("+", 1)[0]
    if dialect in ("postgresql", "postgres"):
        with _engine(url).connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    if dialect == "mysql":
        with _engine(url).connect() as conn:
            conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, 600)"), {"k": f"litlab-{key}"})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": f"litlab-{key}"})
        return
    yield  # an unknown dialect: best effort, no lock


# ------------------------------------------------------------------------------- budget accounting
@dataclass
class Budget:
    n_trials: int
    used: int  # trials that count against n_trials
    done: int  # COMPLETE + PRUNED + counted FAIL
    running: int
    waiting: int  # retries of trials whose process died: popped first by study.ask()

    @property
    def can_ask(self) -> bool:
        return self.waiting > 0 or self.used < self.n_trials

    @property
    def finished(self) -> bool:
        return self.done >= self.n_trials and self.waiting == 0


def uncounted(t) -> bool:
    """A FAIL that was retried (its WAITING copy counts), or that showed the metric is never logged
    (the sweep stopped there: a config mistake, not a trial)."""
    return t.state == TrialState.FAIL and t.user_attrs.get(FAILED) in ("retried", UNLOGGED)


def budget(study: optuna.Study, n_trials: int) -> Budget:
    """Every trial counts against n_trials but the `uncounted` FAILs."""
    trials = study.get_trials(deepcopy=False)
    retried = sum(1 for t in trials if uncounted(t))
    by_state = {s: sum(1 for t in trials if t.state == s) for s in TrialState}
    done = by_state[TrialState.COMPLETE] + by_state[TrialState.PRUNED] + by_state[TrialState.FAIL] - retried
    return Budget(n_trials=n_trials, used=len(trials) - retried, done=done,
                  running=by_state[TrialState.RUNNING], waiting=by_state[TrialState.WAITING])


# ------------------------------------------------------------------------------- heartbeats
def beat(study: optuna.Study, trial_id: int) -> None:
    study._storage.set_trial_user_attr(trial_id, HEARTBEAT, time.time())


def beat_live(study: optuna.Study, trial_ids: list[int]) -> None:
    """The driver's beat for its trial processes that are alive; a trial that has just finished is
    read-only (its process told Optuna before the driver noticed it exit), and a storage hiccup is
    covered by the next beat."""
    for trial_id in trial_ids:
        try:
            beat(study, trial_id)
        except Exception:
            pass


class Heartbeat:
    """Refreshes the trial's heartbeat every `interval` seconds from a daemon thread. A failed beat
    (a storage hiccup) is retried at the next one; `misses_to_warn` failures in a row print one
    line to stderr, since other sweep processes fail and retry a trial whose beats stop for
    grace_period, and one more line when the beats get through again."""

    def __init__(self, study: optuna.Study, trial_id: int, interval: float, number: int | None = None,
                 misses_to_warn: int = 3):
        self.study, self.trial_id, self.interval = study, trial_id, interval
        self.name = f"trial {trial_id if number is None else number}"
        self.misses_to_warn = misses_to_warn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="litlab-heartbeat", daemon=True)

    def __enter__(self):
        beat(self.study, self.trial_id)
        self._thread.start()
        return self

    def _run(self):
        misses = 0
        while not self._stop.wait(self.interval):
            try:
                beat(self.study, self.trial_id)
            except Exception as e:
                misses += 1
                if misses == self.misses_to_warn:
                    _say(f"litlab sweep: {self.name}: {misses} heartbeats in a row failed ({type(e).__name__}: "
                         f"{str(e)[:200]}); if the storage stays unreachable for grace_period, other sweep "
                         "processes will fail and retry this trial")
                continue
            if misses >= self.misses_to_warn:
                _say(f"litlab sweep: {self.name}: heartbeats get through again (after {misses} failed)")
            misses = 0

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fail_and_retry(study: optuna.Study, trial, max_retries: int, reason: str) -> bool:
    """FAIL a RUNNING trial whose process died and, within max_retries, enqueue its params again.
    Returns False if the trial finished meanwhile. Attributes go first: a finished trial is
    read-only."""
    retries = int(trial.user_attrs.get(RETRIES, 0))
    again = retries < max_retries
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, FAILED, "retried" if again else "died")
        storage.set_trial_user_attr(trial._trial_id, "litlab.reason", reason)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # it finished in the meantime
    if again:
        study.enqueue_trial(trial.params, user_attrs={RETRIES: retries + 1, "litlab.retry_of": trial.number},
                            skip_if_exists=False)
    return True


def fail_stale_trials(study: optuna.Study, grace: float, max_retries: int, on_failed=None) -> list:
    """RUNNING trials with no heartbeat for `grace` seconds: FAIL, then retry. Call under the lock."""
    now = time.time()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = t.user_attrs.get(HEARTBEAT) or (t.datetime_start.timestamp() if t.datetime_start else now)
        if now - float(last) <= grace:
            continue
        if not fail_and_retry(study, t, max_retries, f"no heartbeat for {now - float(last):.0f} s (its process died)"):
            continue
        failed.append(t)
        if on_failed:
            on_failed(t)
    return failed
