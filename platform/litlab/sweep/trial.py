"""One trial, in a process of its own: suggest params, run the experiment with pruning, tell Optuna.

The driver asks Optuna for the trial (under the budget lock) and starts `run_trial` in a fresh
process, so nothing leaks from one trial into the next. The trial's process is rank 0: it owns the
Optuna trial and the MLflow child run. With `trainer.strategy=ddp` Lightning re-launches the
driver's command once per extra rank; `LITLAB_TRIAL` (set before fit, inherited by those ranks)
carries the sampled overrides, so every rank builds the same model without asking Optuna, and
`follow_ddp_trial()` runs the rank there. The prune decision is made on rank 0 and broadcast.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import traceback
from dataclasses import dataclass

import optuna
from lightning.pytorch.callbacks import Callback

from litlab import runner, tracking
from litlab.config import parse_override
from litlab.errors import ConfigError, UserError
from litlab.monitor_check import unlogged_metric
from litlab.sweep import TRIAL_ENV
from litlab.sweep import storage as st
from litlab.sweep.spec import SweepSpec, build_pruner, build_sampler, objective_overrides, suggest
from litlab.sweep.values import to_overrides


class PrunedRun(optuna.TrialPruned):
    """Raised on every rank when the pruner stops a trial; the MLflow run ends FINISHED (it did
    what was asked: train until pruned), tagged optuna.state=PRUNED."""

    run_status = "FINISHED"


class TrialReporter(Callback):
    """Tracks the best value of each objective metric; reports the first one to Optuna after every
    validation round and stops the trial on every rank when the pruner says so."""

    def __init__(self, trial: optuna.trial.Trial | None, metrics: list[str], directions: list[str], prune: bool):
        self.trial, self.metrics, self.directions, self.prune = trial, metrics, directions, prune
        self.best: dict[str, float] = {}
        self.rounds = 0
        self.logged: set[str] = set()  # every name seen after a validation round
        self.checked = False  # whether the val/ metrics were looked for

    def on_fit_start(self, trainer, pl_module):
        _between_batches[0] = True  # a stop (SIGINT, SIGTERM) waits for the end of a batch from now on
        if self.trial is not None and trainer.is_global_zero:
            run_id = next((lg.run_id for lg in trainer.loggers if isinstance(lg, tracking.MlflowTracker)), None)
            if run_id:
                self.trial.set_user_attr("litlab.mlflow_run_id", run_id)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _stop_if_asked()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        _stop_if_asked()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        _stop_if_asked()

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        found = trainer.callback_metrics
        self.logged |= set(found)
        for m, d in zip(self.metrics, self.directions):
            if m in found:
                v = float(found[m])  # one host sync per validation round
                better = max if d == "maximize" else min
                self.best[m] = better(self.best.get(m, v), v)
        step, self.rounds = self.rounds, self.rounds + 1
        if not self.prune:
            return
        decision = False
        if trainer.is_global_zero and self.trial is not None and self.metrics[0] in found:
            value = float(found[self.metrics[0]])
            if math.isfinite(value):
                self.trial.report(value, step=step)
                decision = self.trial.should_prune()
        if trainer.world_size > 1:
            decision = trainer.strategy.broadcast(decision, src=0)
        if decision:
            raise PrunedRun(f"pruned after validation round {step}")

    def on_train_epoch_end(self, trainer, pl_module):
        """A val/ metric missing at the end of the first epoch that validated is never logged: the
        trial stops there (before the checkpoint, which watches the first metric, says it its way)."""
        if self.rounds and not self.checked:
            self.checked = True
            found = trainer.callback_metrics
            self.logged |= set(found)
            missing = [m for m in self.metrics if m.startswith("val/") and m not in found]
            if missing:
                raise UnloggedMetric(missing[0], found)


class UnloggedMetric(ConfigError):
    """The sweep's metric is not one the experiment logs: every trial would fail alike, so the sweep
    stops with this one line (exit 2) after the first trial that shows it."""

    def __init__(self, metric: str, logged):
        super().__init__("metric", str(unlogged_metric("metric", metric, logged)).partition(": ")[2])


@dataclass
class TrialJob:
    spec: SweepSpec
    storage_url: str
    study_name: str
    trial_id: int
    number: int
    tracking_uri: str
    parent_run_id: str | None
    experiment_name: str
    gpus: list[int] | None = None
    quiet: bool = False
    driver_id: str = ""  # host:pid of the `litlab sweep` process that asked for this trial


def objective_value(metric: str, result, reporter: TrialReporter) -> float:
    if metric.startswith("test/"):
        value = result.metrics.get(metric)
    else:
        value = reporter.best.get(metric)
    if value is None:
        raise UnloggedMetric(metric, set(result.metrics) | reporter.logged)
    return value


def _as_unlogged(e: BaseException, spec: SweepSpec) -> UnloggedMetric | None:
    """The error that says the sweep's metric is never logged: its own, or the checkpoint's when the
    checkpoint monitors the first metric for the sweep (objective_overrides) and finds it missing."""
    if isinstance(e, UnloggedMetric):
        return e
    monitored = dict(parse_override(o) for o in objective_overrides(spec)).get("callbacks.checkpoint.monitor")
    if isinstance(e, ConfigError) and e.key == "callbacks.checkpoint.monitor" and monitored == spec.metrics[0] \
            and str(e).startswith(f"{e.key}: {monitored!r} is not a metric"):
        said = UnloggedMetric.__new__(UnloggedMetric)  # the same words, told for the sweep's key
        ConfigError.__init__(said, "metric", str(e)[len(e.key) + 2:])
        return said
    return None


_stopping: list[int] = []  # the signal that stops this trial process (the first one; later ones are ignored)
_between_batches = [False]  # set once fit starts: the stop waits for the end of the batch (TrialReporter)


def _on_stop_signal(signum, frame) -> None:
    """SIGINT or SIGTERM in a trial process: a KeyboardInterrupt, once (Lightning stops the run, which
    ends KILLED; run_trial marks the trial for a retry). From the start of fit it is raised at the
    end of the batch: raised in the middle of torch.save it came out as torch's RuntimeError, a
    crash. A second signal (Ctrl+C in the terminal, then the driver passing the stop on) is ignored."""
    if _stopping:
        return
    _stopping.append(signum)
    if not _between_batches[0]:
        raise KeyboardInterrupt


def _stop_if_asked() -> None:
    if _stopping:
        raise KeyboardInterrupt


def run_trial(job: TrialJob) -> None:
    """Process entry point (runs in a fresh process): exit status 0 whatever the trial's outcome;
    the outcome is in Optuna and MLflow. Stopped by SIGINT or SIGTERM, it marks its trial for a
    retry and exits 128 + the signal's number, quietly (the driver says what happened)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _on_stop_signal)
    try:
        _run_trial(job)
    except (KeyboardInterrupt, SystemExit) as e:
        if not _stopping and isinstance(e, SystemExit):
            raise
        code = 128 + (_stopping[0] if _stopping else signal.SIGINT)
    else:
        return
    raise SystemExit(code)  # outside the handler: no traceback, no "During handling of ..."


def _run_trial(job: TrialJob) -> None:
    if job.gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, job.gpus))
    spec = job.spec
    study = optuna.load_study(study_name=job.study_name, storage=st.open_storage(job.storage_url),
                              sampler=build_sampler(spec, seed_offset=job.number), pruner=build_pruner(spec))
    study.get_trials(deepcopy=False)  # sync Optuna's storage cache: the trial was made by the driver
    trial = optuna.trial.Trial(study, job.trial_id)
    state, values, error = optuna.trial.TrialState.FAIL, None, None
    with st.Heartbeat(study, job.trial_id, spec.heartbeat_interval, number=job.number):
        try:
            trial.set_user_attr("litlab.pid", os.getpid())
            trial.set_user_attr("litlab.driver", job.driver_id)
            params = suggest(trial, spec)
            overrides = [*spec.overrides, *objective_overrides(spec), *to_overrides(params)]
            if job.gpus is not None:
                overrides += ["trainer.accelerator=gpu", f"trainer.devices={len(job.gpus)}"]
            trial.set_user_attr("litlab.overrides", overrides)
            os.environ[TRIAL_ENV] = json.dumps({"experiment": str(spec.experiment), "overrides": overrides,
                                                "metrics": spec.metrics, "directions": spec.directions,
                                                "prune": not spec.multi_objective, "tracking_uri": job.tracking_uri})
            reporter = TrialReporter(trial, spec.metrics, spec.directions, prune=not spec.multi_objective)
            result = runner.run(
                spec.experiment, overrides, tracking_uri=job.tracking_uri, callbacks=[reporter],
                parent_run_id=job.parent_run_id,
                extra_tags={"optuna.study": job.study_name, "optuna.trial_number": str(job.number),
                            "optuna.storage": st.redact(job.storage_url)},
                run_name=_run_name(job), experiment=job.experiment_name, quiet=True)
            values = [objective_value(m, result, reporter) for m in spec.metrics]
            state = optuna.trial.TrialState.COMPLETE
        except PrunedRun:
            state = optuna.trial.TrialState.PRUNED
        except (KeyboardInterrupt, SystemExit):
            _tag_child(job, trial, "FAIL")
            st.fail_and_retry(study, study._storage.get_trial(job.trial_id), spec.max_retries, "interrupted")
            raise
        except BaseException as e:  # a crash in the experiment: the trial FAILs, the sweep goes on
            unlogged = _as_unlogged(e, spec)
            if unlogged is not None:  # the sweep stops, saying it (driver.py): not told here
                trial.set_user_attr(st.FAILED, st.UNLOGGED)
                trial.set_user_attr("litlab.reason", str(unlogged)[:2000])
            else:
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                trial.set_user_attr(st.FAILED, f"error: {error}"[:2000])
                if not job.quiet and not isinstance(e, UserError):
                    traceback.print_exc()
        _tag_child(job, trial, state.name)
        try:
            if state == optuna.trial.TrialState.COMPLETE:
                study.tell(trial, values if spec.multi_objective else values[0])
            else:
                study.tell(trial, state=state)
        except RuntimeError as e:
            # GridSampler calls study.stop() once the grid is used up, which Optuna only allows
            # inside study.optimize; the trial's state is stored by then, so this is harmless.
            if "Study.stop" not in str(e):
                raise
    if error and not job.quiet:
        print(f"litlab sweep: trial {job.number} failed: {error}", file=sys.stderr, flush=True)


def _run_name(job: TrialJob) -> str:
    return f"{job.study_name}-trial{job.number:03d}"


def _tag_child(job: TrialJob, trial: optuna.trial.Trial, state: str) -> None:
    """Tag the trial's MLflow child run (recorded by TrialReporter.on_fit_start) with its state."""
    run_id = trial.user_attrs.get("litlab.mlflow_run_id")
    if run_id:
        try:
            tracking.set_tags(job.tracking_uri, run_id, {"optuna.state": state})
        except Exception:
            pass


def follow_ddp_trial() -> int:
    """A DDP rank > 0 of a trial: rebuild the trial's experiment from LITLAB_TRIAL and train."""
    job = json.loads(os.environ[TRIAL_ENV])
    reporter = TrialReporter(None, job["metrics"], job["directions"], prune=job["prune"])
    try:
        runner.run(job["experiment"], job["overrides"], tracking_uri=job["tracking_uri"], callbacks=[reporter],
                   quiet=True)
    except PrunedRun:
        pass
    return 0
