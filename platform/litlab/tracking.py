"""MLflow tracking: the store, the run's life cycle, and a batching Lightning logger.

- `resolve_tracking_uri()`: --tracking-uri > tracking.tracking_uri > MLFLOW_TRACKING_URI >
  sqlite:///mlruns/mlflow.db (artifacts beside the DB in mlruns/artifacts).
- `start_run()` / `attach_run()` / `end_run()`: create a run with params, tags and the resolved
  config, or re-attach to one for `litlab resume` (same run id).
- `MlflowTracker`: a Lightning Logger that never makes one HTTP call per metric per step. Points
  are queued and sent with `log_batch` from a background thread every `flush_interval` seconds.
  Each key's history is a function of the step: a point whose step is not past the key's last
  logged step is dropped. That removes Lightning's repeats (`epoch` is sent with every call) and,
  on resume, the replayed steps between the last checkpoint and a crash.
"""

from __future__ import annotations

import getpass
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
_MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call
_MAX_PARAMS = 100  # ... and on params per call


def resolve_tracking_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_absolute():  # pin it so DDP children and `litlab resume` see the same store
            db = Path.cwd() / db
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
    return uri


_ready: set[str] = set()


def client(uri: str):
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///") and uri not in _ready:
        # MLflow creates/migrates a new SQLite store when the first client is made; two processes
        # doing it at once (two sweeps on a fresh store) break the migration. One at a time.
        import fcntl

        with open(uri[len("sqlite:///"):] + ".init-lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        _ready.add(uri)
    return MlflowClient(tracking_uri=uri)


def _artifact_root(uri: str) -> str | None:
    """For a local SQLite store, artifacts live beside the DB: <dir>/artifacts/<experiment>."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None  # a server decides (proxied artifacts)


def get_or_create_experiment(c, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = _artifact_root(uri)
    try:
        return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    except MlflowException:  # created by a parallel process in between
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
              config_yaml: str, parent_run_id: str | None = None) -> str:
    """Create a RUNNING run holding the flattened config as params, tags and config/resolved.yaml."""
    from mlflow.entities import Param

    c = client(uri)
    exp_id = get_or_create_experiment(c, uri, experiment)
    all_tags = {"mlflow.runName": run_name, "mlflow.user": _user(), **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    plist = [Param(k, _param_str(v)) for k, v in params.items()]
    for chunk in _chunks(plist, _MAX_PARAMS):
        c.log_batch(run_id, params=chunk)
    c.log_text(run_id, config_yaml, "config/resolved.yaml")
    return run_id


def attach_run(uri: str, run_id: str, tags: dict[str, str], new_params: dict[str, Any]) -> dict[str, int]:
    """Mark a run RUNNING again for resume; return {metric key: last logged step}."""
    from mlflow.entities import Param, RunTag

    c = client(uri)
    run = c.get_run(run_id)
    c.update_run(run_id, status="RUNNING")
    known = set(run.data.params)
    plist = [Param(k, _param_str(v)) for k, v in new_params.items() if k not in known]
    for chunk in _chunks(plist, _MAX_PARAMS):
        c.log_batch(run_id, params=chunk)
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    # run.data holds, per key, the value at its largest step: enough to skip replayed steps.
    return {m.key: m.step for m in run.data._metric_objs}


def end_run(uri: str, run_id: str, status: str) -> None:
    try:
        client(uri).set_terminated(run_id, status=status)
    except Exception as e:  # never hide the real error behind a tracking one
        print(f"litlab: warning: could not mark run {run_id} {status}: {e}", file=sys.stderr)


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _param_str(v: Any) -> str:
    s = "null" if v is None else str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


class MlflowTracker(Logger):
    """Lightning logger for one MLflow run; batches metrics; rank 0 only (DDP-safe)."""

    def __init__(self, tracking_uri: str, run_id: str, flush_interval: float = 5.0,
                 last_logged_steps: dict[str, int] | None = None):
        super().__init__()
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.flush_interval = flush_interval
        self._last_step = dict(last_logged_steps or {})
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._error: Exception | None = None
        self.points_logged = 0

    # Lightning's Logger interface -------------------------------------------------------------
    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.run_id

    @property
    @rank_zero_experiment
    def experiment(self):
        return client(self.tracking_uri)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """The runner logs the whole resolved config itself; module hparams add nothing new."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        step = int(step or 0)
        now = int(time.time() * 1000)
        points = []
        for key, value in metrics.items():
            if step <= self._last_step.get(key, -1):
                continue  # already logged at this step (or before a resume)
            self._last_step[key] = step
            points.append(Metric(key=key, value=float(value), timestamp=now, step=step))
        if points:
            self._ensure_worker()
            self._queue.put(points)
            self.points_logged += len(points)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.flush()

    # Files ----------------------------------------------------------------------------------
    @rank_zero_only
    def log_figure(self, figure, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        client(self.tracking_uri).log_figure(self.run_id, figure, artifact_file)
        plt.close(figure)

    @rank_zero_only
    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        client(self.tracking_uri).log_artifact(self.run_id, local_path, artifact_path)

    # Background batching ------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._queue = self._queue or queue.Queue()
            self._worker = threading.Thread(target=self._drain_forever, name="litlab-mlflow", daemon=True)
            self._worker.start()

    def _drain_forever(self) -> None:
        c = client(self.tracking_uri)
        while True:
            time.sleep(self.flush_interval)
            self._send(c)

    def _send(self, c) -> None:
        with _send_lock:
            batch: list = []
            while True:
                try:
                    batch.extend(self._queue.get_nowait())
                except (queue.Empty, AttributeError):
                    break
            for chunk in _chunks(batch, _MAX_BATCH):
                try:
                    c.log_batch(self.run_id, metrics=chunk)
                except Exception as e:  # keep training; report once at flush
                    self._error = e

    def flush(self) -> None:
        """Send every queued point now (called at the end of fit/test and before the run ends)."""
        if self._queue is not None:
            self._send(client(self.tracking_uri))
        if self._error is not None:
            err, self._error = self._error, None
            print(f"litlab: warning: some metrics could not be sent to MLflow: {err}", file=sys.stderr)

    def __getstate__(self):  # ddp_spawn pickles the trainer: threads and queues stay behind
        self.flush()
        state = self.__dict__.copy()
        state.update(_queue=None, _worker=None)
        return state


_send_lock = threading.Lock()
