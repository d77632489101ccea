"""The study loop behind `litlab sweep`.

    spec -> study (created or resumed; its definition checked) -> parent MLflow run (created or reused) ->
    K slots: [lock: fail stale trials, check budget, ask] -> trial process -> ... -> report

Ctrl+C and SIGTERM stop it cleanly (stopping.py); a metric no trial logs stops it after the first
trial that shows it (one line, exit 2).

Trials run in fresh processes forked from a pre-imported server (multiprocessing "forkserver" with
litlab preloaded): isolation without paying the ~5 s Lightning import per trial. Rerunning the same
command resumes the study: it continues to n_trials in total, retrying trials whose process died.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait

import optuna

from litlab import tracking_store as tracking
from litlab.config import flatten, parse_override
from litlab.durations import fmt_duration
from litlab.errors import UserError
from litlab.sweep import definition, report, stopping
from litlab.sweep import storage as st
from litlab.sweep.spec import SweepSpec, build_pruner, build_sampler, load_spec, objective_overrides

PARENT_ATTR = "litlab.mlflow_parent_run_id"


@dataclass
class SweepResult:
    study_name: str
    storage_url: str
    parent_run_id: str | None
    budget: st.Budget
    best_trials: list = field(default_factory=list)


def _context():
    ctx = multiprocessing.get_context("forkserver")
    # Everything a trial imports lazily on its first run (~3 s), so each forked trial starts warm.
    ctx.set_forkserver_preload(["litlab.sweep.preload_start",  # first: no Ctrl+C traceback while it imports
                                "litlab.sweep.trial", "litlab.chapters", "litlab.data", "mlflow",
                                "mlflow.store.tracking.sqlalchemy_store", "mlflow.system_metrics.system_metrics_monitor",
                                "datasets", "matplotlib.pyplot", "optuna.visualization",
                                "litlab.sweep.freeze"])  # last: gc.freeze() what the others made
    return ctx


def _warm(ctx) -> None:
    """Start the forkserver and wait for its imports: one no-op process, started and joined."""
    proc = ctx.Process(target=_no_op, name="litlab-forkserver-warm-up")
    proc.start()
    proc.join()


def _no_op() -> None:
    pass


def gpu_slots(workers: int, gpus_per_trial: int | None, visible: list[int] | None) -> list[list[int] | None]:
    """Pack K trial slots onto the GPUs, G each: slot i gets GPUs [i*G, (i+1)*G)."""
    if not gpus_per_trial:
        return [None] * workers
    visible = list(range(_count_gpus())) if visible is None else visible
    need = workers * gpus_per_trial
    if need > len(visible):
        raise UserError(f"--gpus-per-trial: {workers} workers x {gpus_per_trial} GPUs = {need} GPUs, "
                        f"but {len(visible)} are visible")
    return [visible[i * gpus_per_trial:(i + 1) * gpus_per_trial] for i in range(workers)]


def _count_gpus() -> int:
    import subprocess

    try:  # ask the driver, not CUDA: the sweep process must not create a CUDA context before forking
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def open_study(spec: SweepSpec, url: str, name: str, defined: dict | None = None) -> optuna.Study:
    """Create or load the study; refuse one made with other directions or, given `defined` (see
    definition.py), another definition of its trials."""
    storage = st.open_storage(url)
    with st.budget_lock(url, name):
        study = optuna.create_study(study_name=name, storage=storage, directions=spec.directions,
                                    sampler=build_sampler(spec), pruner=build_pruner(spec), load_if_exists=True)
        have = [d.name.lower() for d in study.directions]
        if have != spec.directions:
            raise UserError(f"direction: study {name!r} in {st.redact(url)} was created with {have}, the sweep file "
                            f"says {spec.directions}; use another --study name")
        if defined is not None:
            definition.check(study, defined, st.redact(url), uncounted=st.uncounted)
            study.set_user_attr(definition.N_TRIALS, spec.n_trials)
    return study


def _parent_run(spec: SweepSpec, study: optuna.Study, url: str, tracking_uri: str, experiment: str) -> str:
    """One MLflow parent run per study, found again on resume through a study user attribute."""
    c = tracking.client(tracking_uri)
    key = f"{PARENT_ATTR}.{hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]}"  # per tracking store
    with st.budget_lock(url, study.study_name):
        run_id = study.user_attrs.get(key)
        if run_id:
            try:
                if c.get_run(run_id).info.lifecycle_stage == "active":
                    c.update_run(run_id, status="RUNNING")
                    return run_id
            except Exception:
                pass
        spec_dict = spec.to_dict()
        if spec_dict.get("storage"):
            spec_dict["storage"] = st.redact(spec_dict["storage"])
        params = flatten({"sweep": spec_dict})
        run_id = tracking.start_run(tracking_uri, experiment, study.study_name, params,
                                    {"litlab.sweep": "true", "optuna.study": study.study_name,
                                     "optuna.storage": st.redact(url), "litlab.sweep_file": str(spec.path)},
                                    spec.path.read_text())
        study.set_user_attr(key, run_id)
    return run_id


def sweep(path: str, overrides: list[str] | None = None, *, n_trials: int | None = None, workers: int = 1,
          storage: str | None = None, study_name: str | None = None, tracking_uri: str | None = None,
          gpus_per_trial: int | None = None, quiet: bool = False) -> SweepResult:
    """Run or resume a study. Ctrl+C or SIGTERM stops it cleanly (stopping.py): the running trials
    are retried by the next run, the parent run ends KILLED, and SweepStopped (a SystemExit of
    status 130 or 143) is raised."""
    live = stopping.Live()
    with stopping.StopSignals() as stop:
        try:
            return _sweep(stop, live, path, overrides, n_trials=n_trials, workers=workers, storage=storage,
                          study_name=study_name, tracking_uri=tracking_uri, gpus_per_trial=gpus_per_trial, quiet=quiet)
        except KeyboardInterrupt:
            pass  # below, once this handler is left: the exit must not carry the KeyboardInterrupt
        except BaseException:
            for proc, _, _ in live.running.values():
                proc.terminate()  # each trial marks itself for a retry (SIGTERM: trial.py)
            if live.parent:
                tracking.end_run(live.uri, live.parent, "FAILED")
            raise
        signum = stop.signum or signal.SIGINT
        stopping.stop_sweep(live, signum)
    raise stopping.SweepStopped(signum)


def _sweep(stop: stopping.StopSignals, live: stopping.Live, path: str, overrides: list[str] | None, *,
           n_trials: int | None, workers: int, storage: str | None, study_name: str | None,
           tracking_uri: str | None, gpus_per_trial: int | None, quiet: bool) -> SweepResult:
    from multiprocessing import forkserver

    spec = load_spec(path, overrides, classes=False)  # a typo told in 0.5 s, before any import of Lightning
    if n_trials is not None:
        if n_trials < 1:
            raise UserError("--n-trials: must be >= 1")
        spec.n_trials = n_trials
    if workers < 1:
        raise UserError("--workers: must be >= 1")
    ctx = _context()
    # Then, before this process imports Lightning (~5-10 s): the forkserver's preload imports then
    # run beside this process's own, on another core, while it checks the sweep with the classes.
    forkserver.ensure_running()
    from litlab import runner
    from litlab.sweep.experiment_checks import check_against_experiment
    from litlab.sweep.trial import TrialJob, run_trial

    stop.check()  # a Ctrl+C in the imports may have been swallowed ("Exception ignored in ...")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # litlab prints its own one line per trial
    check_against_experiment(spec, before_import=False)
    slots = gpu_slots(workers, gpus_per_trial, None)
    url = st.resolve_storage_url(storage or spec.storage)
    name = study_name or spec.name
    uri = tracking.resolve_tracking_uri(tracking_uri)
    base = runner.load_config(spec.experiment, [*spec.overrides, *objective_overrides(spec)])
    experiment = base.tracking.experiment or base.name
    study = open_study(spec, url, name, definition.definition(spec, base.to_dict()))
    live.uri, live.study, live.study_name, live.storage_url, live.max_retries = uri, study, name, url, spec.max_retries
    live.parent = parent = _parent_run(spec, study, url, uri, experiment)
    say = (lambda *a: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    b = st.budget(study, spec.n_trials)
    say(f"litlab sweep: study {name!r} in {st.redact(url)}: {b.done}/{spec.n_trials} trials done, "
        f"{workers} worker(s); MLflow parent run {parent}")

    driver_id = f"{socket.gethostname()}:{os.getpid()}"
    running = live.running  # slot -> (process, trial number, trial id)
    deadline = time.time() + spec.timeout if spec.timeout else None
    stop_asking = False
    unlogged = None  # the line of a trial that showed the metric is never logged
    last_beat = 0.0

    def beat_for_live_trials():  # this driver answers for its trial processes while they live
        nonlocal last_beat
        st.beat_live(study, [trial_id for proc, _, trial_id in running.values() if proc.is_alive()])
        last_beat = time.time()

    if b.can_ask:  # start the forkserver now, so no trial exists while it imports (seconds)
        _warm(ctx)

    def on_stale(t):
        run_id = t.user_attrs.get("litlab.mlflow_run_id")
        if run_id:
            tracking.end_run(uri, run_id, "FAILED")

    while True:
        stop.check()
        free = [s for s in range(workers) if s not in running]
        if deadline and time.time() > deadline and not stop_asking:
            stop_asking = True
            say(f"litlab sweep: timeout of {spec.timeout:g} s reached; finishing the running trials")
        if free and not stop_asking:
            beat_for_live_trials()  # before judging who is stale
            with stop.deferred():  # a trial asked for gets its process: none waits for grace_period
                with st.budget_lock(url, name):
                    st.fail_stale_trials(study, spec.grace_period, spec.max_retries, on_stale)
                    b = st.budget(study, spec.n_trials)
                    trial = study.ask() if b.can_ask else None
                    if trial is not None:
                        st.beat(study, trial._trial_id)  # alive from the moment it exists
                if trial is not None:
                    job = TrialJob(spec, url, name, trial._trial_id, trial.number, uri, parent, experiment,
                                   gpus=slots[free[0]], quiet=quiet, driver_id=driver_id)
                    proc = ctx.Process(target=run_trial, args=(job,), name=f"litlab-trial-{trial.number}")
                    proc.start()
                    running[free[0]] = (proc, trial.number, trial._trial_id)
            if trial is not None:
                continue
            if b.finished:
                stop_asking = True
        if not running:
            if stop_asking:
                break
            time.sleep(min(1.0, spec.heartbeat_interval))  # others hold the budget: wait for them
            continue
        if time.time() - last_beat >= spec.heartbeat_interval:
            beat_for_live_trials()
        ready = wait([p.sentinel for p, _, _ in running.values()], timeout=min(1.0, spec.heartbeat_interval))
        for slot, (proc, number, _) in list(running.items()):
            if proc.sentinel in ready or not proc.is_alive():
                proc.join()
                del running[slot]
                line = _after_trial(study, number, parent, uri, spec, say, workers)
                if line and not unlogged:  # every trial would fail so: stop asking, tell it once
                    unlogged, stop_asking = line, True

    if unlogged:
        live.parent = None  # ended here
        tracking.end_run(uri, parent, "FAILED")
        raise UserError(unlogged)
    b = st.budget(study, spec.n_trials)
    c = tracking.client(uri)
    report.log_study_plots(c, parent, study, spec.metrics)
    tracking.end_run(uri, parent, "FINISHED")
    best = study.best_trials if _any_complete(study) else []
    if not quiet:
        print_report(study, spec, best)
    return SweepResult(name, url, parent, b, best)


def _any_complete(study: optuna.Study) -> bool:
    return any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def sweep_eta(durations: list[float], remaining: int, workers: int) -> float | None:
    """Seconds left: the remaining trials at the mean duration of the finished ones, `workers` at
    a time (None before any trial has finished)."""
    if not durations:
        return None
    return sum(durations) / len(durations) * math.ceil(remaining / max(workers, 1))


def _after_trial(study: optuna.Study, number: int, parent: str, uri: str, spec: SweepSpec, say,
                 workers: int = 1) -> str | None:
    """Log progress to the parent run and one line to the terminal. Returns the error line of a trial
    that showed the metric is never logged (not told here: the sweep stops with it)."""
    from mlflow.entities import Metric

    trials = study.get_trials(deepcopy=False)
    t = next((t for t in trials if t.number == number), None)
    if t is not None and t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get(st.FAILED) == st.UNLOGGED:
        return t.user_attrs.get("litlab.reason") or f"metric: {spec.metrics} is not logged by this experiment"
    counts = {s: sum(1 for x in trials if x.state == s) for s in optuna.trial.TrialState}
    now = int(time.time() * 1000)
    done = counts[optuna.trial.TrialState.COMPLETE] + counts[optuna.trial.TrialState.PRUNED]
    points = [Metric(f"trials_{s.name.lower()}", counts[s], now, done) for s in
              (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)]
    best_text = ""
    if _any_complete(study):
        if spec.multi_objective:
            points.append(Metric("pareto_front_size", len(study.best_trials), now, done))
        else:
            points.append(Metric("best_value", study.best_value, now, done))
            best_text = f"  best {study.best_value:.4g} (#{study.best_trial.number})"
    tracking.client(uri).log_batch(parent, metrics=points)
    if t is not None:
        value = "" if t.values is None else " ".join(f"{m}={v:.4g}" for m, v in zip(spec.metrics, t.values))
        secs = f"{t.duration.total_seconds():.1f}s" if t.duration else ""
        finished = st.budget(study, spec.n_trials).done  # progress: trials done / total (issue 10)
        durations = [x.duration.total_seconds() for x in trials if x.duration is not None and x.state in (
            optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
        eta = sweep_eta(durations, spec.n_trials - finished, workers) if finished < spec.n_trials else None
        eta_text = f"  ETA {fmt_duration(eta)}" if eta is not None else ""
        say(f"[{finished}/{spec.n_trials}] trial {number:>3} {t.state.name:<8} {value} {secs}{best_text}{eta_text}")
    return None


def print_report(study: optuna.Study, spec: SweepSpec, best: list) -> None:
    """The best trials as a table and the exact command that reproduces the best one."""
    from rich.console import Console

    console = Console(stderr=False)
    if not console.is_terminal:
        console = Console(width=200)
    console.print(report.best_trials_table(study, spec.metrics))
    if best:
        top = best[0]
        experiment = report.shown_path(spec.experiment)
        overrides = top.user_attrs.get("litlab.overrides", [])
        console.print(f"reproduce the best trial (#{top.number}):", style="bold")
        console.print(report.reproduce_command(experiment, [], overrides), soft_wrap=True, markup=False)


def show(path: str, overrides: list[str] | None = None, *, storage: str | None = None,
         study_name: str | None = None, n_trials: int | None = None) -> None:
    """`litlab sweep SWEEP.yaml --show`: the study's state, without running anything (the sweep file
    checked as `litlab run` checks before importing Lightning: nothing here needs the classes). The
    total is `n_trials` (or an n_trials= override) if given, else the n_trials the study was last
    run with, else the sweep file's."""
    spec = load_spec(path, overrides, classes=False)
    url = st.resolve_storage_url(storage or spec.storage)
    name = study_name or spec.name
    try:
        study = optuna.load_study(study_name=name, storage=st.open_storage(url))
    except KeyError:
        raise UserError(f"--study: no study {name!r} in {st.redact(url)} yet; run `litlab sweep {path}` first") from None
    given = any(parse_override(o)[0] == "n_trials" for o in overrides or [])
    total = n_trials or (spec.n_trials if given else study.user_attrs.get(definition.N_TRIALS, spec.n_trials))
    recorded = study.user_attrs.get(definition.DEFINITION) or {}
    if recorded.get("metric"):  # the study's own metric names head its table
        spec.metrics = recorded["metric"]
    b = st.budget(study, total)
    print(f"study {name!r} in {st.redact(url)}: {b.done}/{total} done, {b.running} running, "
          f"{b.waiting} waiting")
    print_report(study, spec, study.best_trials if _any_complete(study) else [])
