"""Training progress: a rich bar with throughput and ETA on a terminal that reads the logged metrics
only every N steps, one line per epoch elsewhere, nothing with --quiet."""

from __future__ import annotations

import io
import re
import sys

import lightning as L
import pytest
import rich
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, RichProgressBar
from torch.utils.data import DataLoader, TensorDataset

from helpers import MLP_DIGITS, QUICK
from litlab import progress, runner
from litlab.cli import main

STEPS_PER_EPOCH, EPOCHS, BATCH = 20, 2, 8


class Tiny(L.LightningModule):
    """Linear regression that logs its loss to the progress bar on every step: reading that value
    is a host sync, so how often the bar reads metrics matters."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.lin(x), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.mse_loss(self.lin(x), y), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS_PER_EPOCH * BATCH, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=BATCH)


def _counting(cls):
    class Counting(cls):
        reads = 0

        def get_metrics(self, trainer, pl_module):
            type(self).reads += 1
            return super().get_metrics(trainer, pl_module)

    return Counting


@pytest.fixture
def restore_rich_console():
    yield
    rich.reconfigure()  # the bars reconfigure rich's global console


def _fit(bar) -> None:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=2, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(Tiny(), _loader(), _loader())


def test_bar_shows_throughput_and_eta_and_reads_metrics_every_n_steps(restore_rich_console):
    screen = io.StringIO()
    bar = _counting(progress.LitlabProgressBar)(
        metrics_every=5, console_kwargs={"file": screen, "force_terminal": True, "width": 200})
    _fit(bar)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # without ANSI codes
    assert re.search(r"epoch 2/2 .*\d+/20 .*[\d.]+ steps/s  [\d,]+ samples/s  fit ETA ", text), text[-800:]
    assert "train/loss_step: " in text and "val/loss: " in text and "v_num" not in text
    steps = STEPS_PER_EPOCH * EPOCHS
    # every 5th step, plus the end of each epoch and of each validation: 8 + 2 + 2
    assert bar.reads <= steps // 5 + 2 * EPOCHS, bar.reads

    reference = _counting(RichProgressBar)(console_kwargs={"file": io.StringIO(), "force_terminal": True})
    _fit(reference)
    assert reference.reads >= steps  # Lightning's own bar reads them after every step


def test_batch_size_from_shapes():
    x = torch.zeros(7, 3)
    assert progress.batch_size((x, torch.zeros(7))) == 7
    assert progress.batch_size({"input_ids": torch.zeros(5, 9, dtype=torch.long)}) == 5
    assert progress.batch_size(type("GraphBatch", (), {"num_graphs": 3})()) == 3
    assert progress.batch_size(object()) is None
    assert [type(c) for c in progress.progress_callbacks(True, terminal=True)] == [progress.LitlabProgressBar]
    assert [type(c) for c in progress.progress_callbacks(True, terminal=False)] == [progress.EpochLines]
    assert progress.progress_callbacks(False, terminal=True) == []


def test_without_a_terminal_one_line_per_epoch_and_quiet_prints_only_the_result(tracking_uri, capsys):
    quick = QUICK + ["tracking.system_metrics=false"]
    result = runner.run(MLP_DIGITS, quick, tracking_uri=tracking_uri)  # stderr is captured: no terminal
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert 1 <= len(lines) <= 2 and lines[-1].startswith("epoch 2/2  train/loss="), err[-2000:]
    last = lines[-1]
    assert re.search(r"val/acc=0\.\d+", last) and re.search(r"[\d.]+ steps/s  [\d,]+ samples/s", last), last
    assert "━" not in err and "it/s" not in err  # no bar
    assert result.status == "FINISHED"

    assert main(["run", str(MLP_DIGITS), "--quiet", "--tracking-uri", tracking_uri, *quick]) == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(r"[0-9a-f]{32} test/acc=0\.\d{4}  test/loss=\d+\.\d{4}\n", out), out
    assert "epoch" not in err and "━" not in err


def test_runner_draws_the_bar_on_a_terminal(tracking_uri, monkeypatch, restore_rich_console):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    seen = {}

    class Spy(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["bar"] = trainer.progress_bar_callback

    runner.run(MLP_DIGITS, QUICK + ["trainer.max_epochs=1", "tracking.system_metrics=false"], tracking_uri=tracking_uri,
               callbacks=[Spy()])
    assert isinstance(seen["bar"], progress.LitlabProgressBar)


def test_one_duration_format_for_every_line():
    """The progress ETA, the sweep's tables and `litlab runs` write durations one way."""
    from litlab.durations import fmt_duration

    cases = {None: "-", float("nan"): "-", float("inf"): "-", -3.0: "0.0s", 0.04: "0.0s", 4.25: "4.2s",
             59.94: "59.9s", 59.96: "1m00s", 65.4: "1m05s", 3599.4: "59m59s", 3600: "1h00m00s",
             7387.0: "2h03m07s", 100 * 3600 + 61: "100h01m01s"}
    assert {s: fmt_duration(s) for s in cases} == cases
