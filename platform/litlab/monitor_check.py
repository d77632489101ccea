"""The metric that checkpointing or early stopping watches must be one the model logs.

Lightning finds a misspelt `monitor` at the end of the first epoch and raises a traceback
(ModelCheckpoint's MisconfigurationException, EarlyStopping's RuntimeError). These subclasses raise
at that same moment, in the same cases, a one-line ConfigError naming the setting, the nearest
logged name and what the model logs: the CLI shows it and exits 2.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from litlab.errors import ConfigError, did_you_mean


def unlogged_metric(key: str, metric: str, logged) -> ConfigError:
    names = sorted(logged)
    noise = ("epoch", "step")  # Lightning's own counters; lr-* and system/* are not the model's
    shown = ", ".join(n for n in names if n not in noise and not n.startswith(("lr-", "system/"))) or "nothing"
    return ConfigError(key, f"{metric!r} is not a metric this model logs{did_you_mean(metric, names)}; "
                            f"it logs: {shown}")


class BestCheckpoint(ModelCheckpoint):
    """The top-k checkpoints on `monitor` (callbacks.checkpoint)."""

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        if (self.save_top_k != 0 and self.monitor is not None and self.monitor not in monitor_candidates
                and trainer.fit_loop.epoch_loop.val_loop._has_run):  # where Lightning raises
            raise unlogged_metric("callbacks.checkpoint.monitor", self.monitor, monitor_candidates)
        super()._save_topk_checkpoint(trainer, monitor_candidates)


class CheckedEarlyStopping(EarlyStopping):
    """callbacks.early_stopping."""

    def _validate_condition_metric(self, logs) -> bool:
        if self.strict and self.monitor not in logs:
            raise unlogged_metric("callbacks.early_stopping.monitor", self.monitor, logs)
        return super()._validate_condition_metric(logs)
