"""A NaN or inf loss stops the run FAILED with a clear reason, keeping the last good checkpoint, or
skips the batch with trainer.skip_nonfinite=true."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from mlflow import MlflowClient

from helpers import MLP_DIGITS, run_cli
from litlab import runner
from litlab.errors import TrainingDiverged

SMALL = ["model.hidden=[32]", "data.batch_size=32", "trainer.max_epochs=3", "tracking.system_metrics=false",
         "callbacks.checkpoint.every_n_train_steps=5"]


class PoisonBatches(L.Callback):
    """Turns the inputs of the batches at the given global steps into NaN."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            batch[0].fill_(float("nan"))


def _finite(state_dict) -> bool:
    return all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point())


def test_nan_loss_fails_the_run_and_keeps_the_last_good_checkpoint(tracking_uri, tmp_path):
    with pytest.raises(TrainingDiverged, match="NaN or infinite"):
        runner.run(MLP_DIGITS, SMALL, tracking_uri=tracking_uri, callbacks=[PoisonBatches({33})])
    c = MlflowClient(tracking_uri=tracking_uri)
    (run,) = c.search_runs(c.search_experiments()[0].experiment_id)
    assert run.info.status == "FAILED"
    assert "NaN or infinite" in run.data.tags["litlab.failure_reason"]
    last = torch.load(f"{run.data.tags['litlab.checkpoint_dir']}/last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] <= 33 and _finite(last["state_dict"])  # written before the bad step


def test_skip_nonfinite_skips_only_the_bad_steps(tracking_uri):
    result = runner.run(MLP_DIGITS, [*SMALL, "trainer.skip_nonfinite=true"], tracking_uri=tracking_uri,
                        callbacks=[PoisonBatches({7, 20})])
    assert result.status == "FINISHED" and result.metrics["test/acc"] > 0.8
    c = MlflowClient(tracking_uri=tracking_uri)
    skipped = c.get_metric_history(result.run_id, "train/skipped_steps")
    assert max(m.value for m in skipped) == 2
    last = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert _finite(last["state_dict"])


@pytest.mark.slow
def test_divergence_from_the_cli_is_one_line_and_exit_1(tmp_path):
    p = run_cli("run", str(MLP_DIGITS), "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "optim.name=sgd",
                "optim.lr=10", "model.hidden=[256,256]", "optim.scheduler.name=none", "trainer.max_epochs=3",
                "tracking.system_metrics=false", cwd=tmp_path)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("litlab run: training diverged: the loss became NaN")
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    (run,) = c.search_runs(c.search_experiments()[0].experiment_id)
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("losses, bad", [
    ([1.0, 2.5, 0.1], False),
    ([1.0, float("inf"), 0.1], True),
    ([float("nan")], True),
    ([-float("inf"), 3.0], True),
])
@pytest.mark.parametrize("shape", [(), (3,)], ids=["scalar", "vector"])
def test_guard_sees_a_nonfinite_loss_by_reading_or_by_kernels(losses, bad, shape):
    """The CPU path (the losses read) and the device path (folded into a NaN-sticky flag, run here
    on CPU tensors) agree with math.isfinite, for scalar and per-sample losses."""
    import math

    from litlab.guards import NonFiniteGuard, _poisoned_all

    tensors = [torch.full(shape, v) for v in losses]
    guard = NonFiniteGuard(check_every=10)
    for t in tensors:
        guard.on_before_backward(None, None, t)
    guard._fold()
    assert (guard._flag is not None and bool(guard._flag != 0)) == bad
    assert (not math.isfinite(float(_poisoned_all(tensors)))) == bad
    assert bad == any(not math.isfinite(v) for v in losses)
