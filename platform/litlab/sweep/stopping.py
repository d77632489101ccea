"""Stopping a sweep on Ctrl+C (SIGINT) or SIGTERM (`timeout`, a batch scheduler, `kill`).

Both are handled alike, in the driver and in each trial process:
- the driver prints one line, passes the stop on to its trial processes (SIGTERM: they may not have
  had the signal, e.g. `kill PID` or `timeout` without --foreground), waits for them, marks each of
  its trials still RUNNING as FAIL and enqueues it again (a rerun of the same command retries it),
  ends their MLflow runs and the parent run KILLED, and exits 128 + the signal's number (130, 143)
  with no traceback;
- a trial process marks its own trial so (trial.py) and exits quietly.

The first signal raises KeyboardInterrupt in the main thread; the next ones are ignored, so that a
second Ctrl+C cannot break the cleanup. The signal is also recorded: a KeyboardInterrupt Python
swallows (raised inside a weakref callback or a __del__, "Exception ignored in ...") still stops the
driver at its next `check()`.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TRIALS_GRACE = 30.0  # seconds the stopped trial processes get to mark their trial and end their run


class SweepStopped(SystemExit):
    """The sweep was stopped by a signal and cleaned up after itself; it said so in one line. A
    SystemExit whose status is 128 + the signal's number: the command exits with it, no traceback."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def stopped_by(signum: int) -> str:
    return "interrupted (Ctrl+C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


class StopSignals:
    """SIGINT and SIGTERM handlers for the duration of a `with` block (main thread only)."""

    def __init__(self):
        self.signum: int | None = None
        self._deferring = 0
        self._pending = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            return  # stopping already
        self.signum = signum
        if self._deferring:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        """Hold a stop until the block's end: for steps that must not be cut in two (asking Optuna
        for a trial and starting its process: a trial with no process would wait for grace_period)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self._pending and not self._deferring:
            self._pending = False
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if a stop was asked (and maybe swallowed where it landed)."""
        if self.signum is not None:
            raise KeyboardInterrupt


@dataclass
class Live:
    """What a stopping driver cleans up: filled in as the sweep gets going."""

    uri: str | None = None
    study: object | None = None  # optuna.Study
    study_name: str = ""
    storage_url: str = ""
    parent: str | None = None
    max_retries: int = 3
    running: dict = field(default_factory=dict)  # slot -> (process, trial number, trial id)


def stop_sweep(live: Live, signum: int) -> None:
    """After the driver's KeyboardInterrupt: stop the trials, mark them for retry, end the runs."""
    from litlab.sweep import storage as st

    trials = list(live.running.values())
    doing = "; stopping the running trials" if trials else ""
    print(f"litlab sweep: {stopped_by(signum)}{doing}; rerun the same command to continue", file=sys.stderr,
          flush=True)
    _stop_processes([proc for proc, _, _ in trials])
    _stop_forkserver()
    if live.study is None:
        return
    mine = {trial_id: number for _, number, trial_id in trials}
    try:
        with st.budget_lock(live.storage_url, live.study_name):
            for trial_id in mine:
                t = live.study._storage.get_trial(trial_id)
                if t.state.name == "RUNNING":  # its process could not mark it (killed before it could)
                    st.fail_and_retry(live.study, t, live.max_retries, "interrupted")
    except Exception as e:  # the storage is gone: the next sweep fails them as stale, after grace_period
        print(f"litlab sweep: warning: could not mark the stopped trials for retry ({type(e).__name__}: "
              f"{str(e)[:200]}); the next sweep will retry them after grace_period", file=sys.stderr)
    if live.parent and live.uri:
        _end_trial_runs(live, set(mine.values()))
        from litlab import tracking_store as tracking

        tracking.end_run(live.uri, live.parent, "KILLED")


def _stop_processes(procs: list) -> None:
    import os

    for proc in procs:
        if proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)  # the trial handles it as Ctrl+C (trial.py)
    deadline = time.time() + TRIALS_GRACE
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.time()))
    for proc in procs:
        if proc.is_alive():  # stuck: its trial is marked below
            proc.kill()
            proc.join(timeout=5)


def _stop_forkserver() -> None:
    """The trials' forkserver may still be importing (it ignores Ctrl+C meanwhile): it would go on
    for seconds after the sweep has ended. It has no trial left to fork."""
    import os
    from multiprocessing import forkserver

    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


def _end_trial_runs(live: Live, numbers: set[int]) -> None:
    """The MLflow runs of the stopped trials that their process could not end (killed before)."""
    from litlab import tracking_store as tracking

    try:
        c = tracking.client(live.uri)
        experiment_id = c.get_run(live.parent).info.experiment_id
        runs = c.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{live.parent}' "
                                                            "and attributes.status = 'RUNNING'")
    except Exception:
        return
    for run in runs:
        if run.data.tags.get("optuna.trial_number", "").isdigit() and int(run.data.tags["optuna.trial_number"]) in numbers:
            with contextlib.suppress(Exception):
                tracking.set_tags(live.uri, run.info.run_id, {"optuna.state": "FAIL"})
            tracking.end_run(live.uri, run.info.run_id, "KILLED")
