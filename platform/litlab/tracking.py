"""MLflow tracking: the store, the run's life cycle, and a batching Lightning logger.

- `resolve_tracking_uri()`: --tracking-uri > tracking.tracking_uri > MLFLOW_TRACKING_URI >
  sqlite:///mlruns/mlflow.db (artifacts beside the DB in mlruns/artifacts).
- `start_run()` / `attach_run()` / `end_run()`: create a run with params, tags and the resolved
  config, or re-attach to one for `litlab resume` (same run id).
- `MlflowTracker`: a Lightning Logger that never makes one HTTP call per metric per step. Points
  are journaled locally (`litlab.spool`) and sent with `log_batch` from a background thread every
  `flush_interval` seconds; a tracking outage never stops training.
  Each key's history is a function of the step: a point whose step is not past the key's last
  logged step is dropped. That removes Lightning's repeats (`epoch` is sent with every call) and,
  on resume, the replayed steps between the last checkpoint and a crash.
"""

from __future__ import annotations

import getpass
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from litlab.server_probe import check_reachable

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
_MAX_PARAMS = 100  # ... and on params per call


def resolve_tracking_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_absolute():  # pin it so DDP children and `litlab resume` see the same store
            db = Path.cwd() / db
        from litlab.preflight import writable_dir

        writable_dir(db.parent, "the tracking store")
        uri = f"sqlite:///{db}"
    return uri


_ready: set[str] = set()


# MLflow's REST client retries a failed call for minutes (7 retries, back-off factor 2), blocking
# whoever called. litlab keeps unsent metrics in its spool and retries on its own, so it asks MLflow
# to give up sooner; the user's own settings of these variables win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def client(uri: str):
    from mlflow import MlflowClient

    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)

    if uri.startswith("sqlite:///") and uri not in _ready:
        from litlab.sqlite_template import ensure_store

        ensure_store(Path(uri[len("sqlite:///"):]))
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

    from litlab.redaction import redact, redact_mapping

    params, tags, config_yaml = redact_mapping(params), redact_mapping(tags), redact(config_yaml)
    run_name = redact(run_name)
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

    from litlab.redaction import redact_mapping

    tags, new_params = redact_mapping(tags), redact_mapping(new_params)
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


def end_run(uri: str, run_id: str, status: str) -> bool:
    """Mark the run ended; if the server cannot be reached, keep the status for `litlab sync`."""
    try:
        check_reachable(uri)
        client(uri).set_terminated(run_id, status=status)
        return True
    except Exception as e:  # never hide the real error behind a tracking one
        from litlab.spool import MetricSpool, default_spool_dir

        MetricSpool(default_spool_dir(), run_id).record_status(status)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print(f"litlab: warning: could not mark run {run_id} {status} ({first}); kept for "
              f"`litlab sync {run_id}`", file=sys.stderr)
        return False


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    from litlab.redaction import redact_mapping

    tags = redact_mapping(tags)
    check_reachable(uri)
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
    """Lightning logger for one MLflow run; rank 0 only (DDP-safe).

    Every point goes to the run's local journal first (`litlab.spool.MetricSpool`), and a
    background thread sends the journal in `log_batch` calls every `flush_interval` seconds. If the
    tracking server is unreachable, training goes on: one warning, retries with back-off, and the
    backlog is sent when the server is back (or by `litlab sync RUN_ID` after the process ended)."""

    def __init__(self, tracking_uri: str, run_id: str, flush_interval: float = 5.0,
                 last_logged_steps: dict[str, int] | None = None, spool_dir: str | Path | None = None,
                 flush_timeout: float = 30.0):
        super().__init__()
        from litlab.spool import MetricSpool, default_spool_dir

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.flush_interval = flush_interval
        self.flush_timeout = flush_timeout
        self.spool = MetricSpool(spool_dir or default_spool_dir(), run_id)
        self._last_step = dict(last_logged_steps or {})
        self._in_flight: deque = deque()  # log_tensor_metrics: (keys, host values, copy event, numbers, step, time)
        self._worker: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = threading.Event()  # close(): the sender thread ends
        self._outage: str | None = None  # the error while the server is unreachable
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
        self._land(wait=True)  # earlier tensor metrics first (their copies are done: Lightning synced)
        self._journal(metrics, int(step or 0), int(time.time() * 1000))

    @rank_zero_only
    def log_tensor_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Metrics given as device tensors (scalars) or numbers, journaled without a host sync: the
        tensors are copied to pinned host memory asynchronously and journaled when the copy has
        landed, at a later call or at flush() (litlab.module.LitlabModule.log_step_metrics)."""
        import torch

        now = int(time.time() * 1000)
        tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
        numbers = {k: v for k, v in metrics.items() if k not in tensors}
        host, copied = None, None
        if tensors and not self._in_flight and all(v.is_cpu for v in tensors.values()):
            # host tensors: read now (no device to wait for), journaled in this call
            self._journal({**{k: v.item() for k, v in tensors.items()}, **numbers}, step, now)
            return
        if tensors:
            values = torch.stack([v.detach().reshape(()).to(torch.float64 if v.dtype == torch.float64 else torch.float32)
                                  for v in tensors.values()])
            if values.is_cuda:
                host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                host.copy_(values, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
            else:
                host = values
        self._in_flight.append((list(tensors), host, copied, numbers, step, now))
        self._land(wait=False)

    def land_pending(self) -> None:
        """Journal every tensor metric still being copied to the host (waits for the copies)."""
        self._land(wait=True)

    def _land(self, wait: bool) -> None:
        """Journal the asynchronously copied metrics whose copy is done (all of them if `wait`), in order."""
        while self._in_flight:
            keys, host, copied, numbers, step, now = self._in_flight[0]
            if copied is not None:
                if not wait and not copied.query():
                    return
                copied.synchronize()
            self._in_flight.popleft()
            values = dict(zip(keys, host.tolist())) if keys else {}
            self._journal({**values, **numbers}, step, now)

    def _journal(self, metrics: dict[str, float], step: int, now: int) -> None:
        points = []
        for key, value in metrics.items():
            if step <= self._last_step.get(key, -1):
                continue  # already logged at this step (or before a resume)
            self._last_step[key] = step
            points.append((key, float(value), now, step))
        if points:
            self.spool.append(points)
            self.points_logged += len(points)
            self._ensure_worker()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """The end of fit or test: one attempt to send, no waiting (the run's end waits, up to
        flush_timeout, in litlab.run_io.finish_run; the spool keeps what is not sent)."""
        self.flush(timeout=0)

    # Files ----------------------------------------------------------------------------------
    @rank_zero_only
    def log_figure(self, figure, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        try:
            check_reachable(self.tracking_uri)
            client(self.tracking_uri).log_figure(self.run_id, figure, artifact_file)
        except Exception as e:  # keep it for `litlab sync`
            local = self.spool.dir / ".files" / self.run_id / artifact_file  # dot: not a run id to `litlab sync`
            local.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(local)
            self.spool.record_artifact(str(local), str(Path(artifact_file).parent) or None)
            self._report_outage(e)
        finally:
            plt.close(figure)

    @rank_zero_only
    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        try:
            check_reachable(self.tracking_uri)
            client(self.tracking_uri).log_artifact(self.run_id, local_path, artifact_path)
        except Exception as e:
            self.spool.record_artifact(str(Path(local_path).resolve()), artifact_path)
            self._report_outage(e)

    # Background sending ---------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if (self._worker is None or not self._worker.is_alive()) and not self._closed.is_set():
            self._worker = threading.Thread(target=self._send_forever, name="litlab-mlflow", daemon=True)
            self._worker.start()

    def _send_forever(self) -> None:
        delay = self.flush_interval
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            if self._closed.is_set():
                return
            delay = self.flush_interval if self._send_pending() else min(max(2 * delay, 1.0), 30.0)

    def close(self) -> None:
        """End the background sender and close the journal; the run's end calls it after its last
        flush (the runner: once the run is over, whatever its end). Points logged after this are
        still journaled, for flush() or `litlab sync`. Without it each run would leave a thread
        behind that wakes every flush_interval for good (litlab.run in a notebook, a benchmark:
        many runs in one process)."""
        self._closed.set()
        self._wake.set()
        worker, self._worker = self._worker, None
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=2.0)  # a send in progress ends first (not a stuck one: a daemon thread)
        self.spool.close()

    def _send_pending(self) -> bool:
        """Send the unsent journal; False (and one warning per outage) if the server is unreachable."""
        from litlab.spool import send_points

        with _send_lock:
            try:
                check_reachable(self.tracking_uri)
                sent = send_points(client(self.tracking_uri), self.spool)
            except Exception as e:  # keep training; the journal keeps the points
                self._report_outage(e)
                return False
        if self._outage is not None:
            self._outage = None
            print(f"litlab: tracking server reachable again: sent {sent} spooled metric points", file=sys.stderr)
        return True

    def _report_outage(self, error: Exception) -> None:
        if self._outage is None:
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            print(f"litlab: warning: tracking server unreachable ({first}); training goes on and metrics "
                  f"are kept in {self.spool.path} until it is back", file=sys.stderr)
        self._outage = str(error)

    def flush(self, timeout: float | None = None) -> bool:
        """Send every journaled point now, retrying for up to `timeout` seconds (default
        flush_timeout) while the server is unreachable. True when nothing is left unsent."""
        self._land(wait=True)
        deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
        delay = 0.5
        while not self._send_pending():
            if time.monotonic() + delay > deadline:
                return False
            time.sleep(delay)
            delay = min(2 * delay, 5.0)
        return True

    @property
    def unreachable(self) -> bool:
        return self._outage is not None

    def __getstate__(self):  # ddp_spawn pickles the trainer: threads stay behind
        self.flush()
        self.spool.close()
        state = self.__dict__.copy()
        state.update(_worker=None, _wake=threading.Event(), _closed=threading.Event())
        return state


_send_lock = threading.Lock()
