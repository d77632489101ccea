"""A monitored metric the model does not log (litlab/monitor_check.py): one line, exit 2."""

from __future__ import annotations

import pytest

from helpers import MLP_DIGITS, QUICK
from litlab import runner
from litlab.cli import main

LOGS = "train/acc, train/loss, train/loss_epoch, val/acc, val/loss"


@pytest.mark.parametrize("overrides, line", [
    (["callbacks.checkpoint.monitor=val/accc"],
     f"callbacks.checkpoint.monitor: 'val/accc' is not a metric this model logs (did you mean 'val/acc'?); it logs: "
     f"{LOGS}"),
    (["callbacks.early_stopping.enabled=true", "callbacks.early_stopping.monitor=val/los",
      "callbacks.early_stopping.mode=min"],
     f"callbacks.early_stopping.monitor: 'val/los' is not a metric this model logs (did you mean 'val/loss'?); it "
     f"logs: {LOGS}"),
])
def test_a_metric_the_model_does_not_log_is_one_line_naming_the_setting(overrides, line, tracking_uri, capsys):
    """Lightning raised a traceback at the first epoch's end (exit 1)."""
    code = main(["run", str(MLP_DIGITS), "--tracking-uri", tracking_uri, "-q", *QUICK, "trainer.max_epochs=1",
                 "tracking.system_metrics=false", *overrides])
    assert (code, capsys.readouterr().err.splitlines()) == (2, [f"litlab run: error: {line}"])


def test_a_training_metric_logged_at_the_epochs_end_may_be_monitored(tracking_uri):
    result = runner.run(MLP_DIGITS, QUICK + ["callbacks.checkpoint.monitor=train/loss_epoch", "callbacks.checkpoint.mode=min",
                                             "tracking.system_metrics=false"], tracking_uri=tracking_uri)
    assert result.status == "FINISHED" and result.best_checkpoint and result.best_score > 0
