"""MLflow tracking: the store, the run's life cycle, and a batching Lightning logger.

- The store and a run's life cycle (`resolve_tracking_uri`, `client`, `start_run`, `attach_run`,
  `end_run`, `set_tags`) live in `litlab.tracking_store`, which imports no Lightning, and are
  re-exported here.
- `MlflowTracker`: a Lightning Logger that never makes one HTTP call per metric per step. Points
  are journaled locally (`litlab.spool`) and sent with `log_batch` from a background thread every
  `flush_interval` seconds; a tracking outage never stops training.
  Each key's history is a function of the step: a point whose step is not past the key's last
  logged step is dropped. That removes Lightning's repeats (`epoch` is sent with every call) and,
  on resume, the replayed steps between the last checkpoint and a crash.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from litlab.server_probe import check_reachable
from litlab.tracking_store import (  # noqa: F401  (re-exported: litlab.tracking is the one tracking API)
    _ready,
    attach_run,
    client,
    end_run,
    find_run,
    get_or_create_experiment,
    resolve_tracking_uri,
    set_tags,
    start_run,
)


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
