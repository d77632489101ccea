"""What a run sends to its trackers beyond metrics, and how it ends there, outage or not.

`finish_run()` flushes the metric journal, uploads checkpoints and the learning-curve plot and
marks the run FINISHED. If the tracking server cannot be reached at that point, nothing is lost:
the journal, the files to upload and the final status stay in the spool (`litlab.spool`) and
`litlab sync RUN_ID` (or `litlab resume`) sends them later; the user is told so in one line.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

from litlab import config as config_mod
from litlab import tracking
from litlab.config import Config
from litlab.errors import UserError
from litlab.plots import learning_curves


def finish_run(uri: str, run_id: str, cfg: Config, tracker, sysmon, best: str | None, last: str | None) -> bool:
    """End a successful run in MLflow; True if everything reached the server."""
    complete = tracker.flush()
    if complete:
        try:
            _upload_outputs(uri, run_id, cfg, best, last)
        except Exception as e:  # keep the checkpoints for `litlab sync`
            for name, path in (("best.ckpt", best), ("last.ckpt", last)):
                if cfg.tracking.log_checkpoints and path and Path(path).exists():
                    tracker.spool.record_artifact(str(Path(path).resolve()), "checkpoints")
            tracker._report_outage(e)
            complete = False
    if sysmon is not None:
        sysmon.finish()
    if complete and tracking.end_run(uri, run_id, "FINISHED"):
        tracker.spool.remove()
        return True
    if complete:  # the status alone is pending (end_run kept it)
        return False
    tracker.spool.record_status("FINISHED")
    if not tracker.spool.pending_artifacts() and cfg.tracking.log_checkpoints:
        for path in (best, last):
            if path and Path(path).exists():
                tracker.spool.record_artifact(str(Path(path).resolve()), "checkpoints")
    print(f"litlab: the tracking server is unreachable: run {run_id} ended FINISHED here; its last "
          f"{tracker.spool.pending_points()} metric points, checkpoints and status are kept in "
          f"{tracker.spool.dir}: send them with `litlab sync {run_id}`", file=sys.stderr)
    return False


def wandb_logger(cfg: Config, run_id: str):
    from litlab.redaction import redact, redact_mapping

    save_dir = Path("mlruns") / "wandb"
    save_dir.mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(project=cfg.tracking.wandb_project, name=redact(cfg.tracking.run_name or cfg.name),
                         id=run_id, save_dir=str(save_dir), offline=cfg.tracking.wandb == "offline",
                         resume="allow")
    logger.log_hyperparams(redact_mapping(config_mod.flatten(cfg.to_dict())))
    return logger


def finish_wandb(loggers: list) -> None:
    """End this run's W&B run: otherwise the next litlab run in the same process (a notebook, a
    test) would be logged into it, since WandbLogger reuses an active `wandb.run`."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            try:
                logger._experiment.finish()
            except Exception as e:  # never hide the run's own outcome
                print(f"litlab: warning: could not finish the W&B run: {e}", file=sys.stderr)


def start_system_metrics(cfg: Config, uri: str, run_id: str, resumed: bool):
    if not cfg.tracking.system_metrics:
        return None

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class FinalSampleMonitor(SystemMetricsMonitor):
        """MLflow's monitor publishes only every full interval; also publish what was sampled at the
        end, so runs shorter than the interval still get system/* metrics."""

        def finish(self):
            super().finish()
            try:
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())
                self.mlflow_logger.flush()
            except Exception as e:
                logging.getLogger(__name__).warning("could not log final system metrics: %s", e)

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = FinalSampleMonitor(run_id, sampling_interval=cfg.tracking.system_metrics_interval,
                                   resume_logging=resumed, tracking_uri=uri)
    monitor.start()
    return monitor


def _upload_outputs(uri: str, run_id: str, cfg: Config, best: str | None, last: str | None) -> None:
    c = tracking.client(uri)
    if cfg.tracking.log_checkpoints and (best or last):
        with tempfile.TemporaryDirectory() as tmp:
            for name, path in (("best.ckpt", best), ("last.ckpt", last)):
                if path and Path(path).exists():
                    _link_or_copy(Path(path), Path(tmp) / name)
            c.log_artifacts(run_id, tmp, "checkpoints")
    fig = learning_curves(c, run_id, f"{cfg.name} ({cfg.model['name']} on {cfg.data['name']})")
    if fig is not None:
        import matplotlib.pyplot as plt

        c.log_figure(run_id, fig, "plots/learning_curves.png")
        plt.close(fig)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def close_failed(uri: str, run_id: str, exc: BaseException, tracker, sysmon, delete: bool) -> None:
    killed = isinstance(exc, (KeyboardInterrupt, SystemExit))
    # An exception may say how the run ends (a pruned sweep trial ends FINISHED, stopped on purpose).
    status = getattr(exc, "run_status", None) or ("KILLED" if killed else "FAILED")
    try:
        if tracker is not None:
            tracker.flush(timeout=min(tracker.flush_timeout, 10.0))
        if sysmon is not None:
            sysmon.finish()
        if delete and isinstance(exc, UserError):
            tracking.client(uri).delete_run(run_id)  # a config mistake found before training: no run
            return
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = "interrupted" if killed else f"{type(exc).__name__}: {first_line}"
        tracking.set_tags(uri, run_id, {"litlab.stop_reason" if status == "FINISHED" else "litlab.failure_reason":
                                        reason[:5000]})
    except Exception:
        pass
    tracking.end_run(uri, run_id, status)
