"""The model table a run prints before training (litlab/model_summary.py)."""

from __future__ import annotations

import re

import lightning as L
import torch
import torchmetrics
from torch import nn

from helpers import MLP_DIGITS, QUICK
from litlab import runner
from litlab.epoch_stats import DeviceMean
from litlab.model_summary import RunModelSummary, keeps_score


def test_only_parameterless_metrics_and_their_containers_count_as_score_keeping():
    assert keeps_score(torchmetrics.Accuracy(task="multiclass", num_classes=3))
    assert keeps_score(nn.ModuleDict({"acc": torchmetrics.MeanMetric(), "loss": DeviceMean()}))
    assert not keeps_score(nn.Linear(2, 2))
    assert not keeps_score(nn.ModuleDict())  # empty: nothing says what it is for
    assert not keeps_score(nn.ModuleDict({"acc": torchmetrics.MeanMetric(), "head": nn.Linear(2, 2)}))
    assert not keeps_score(nn.ReLU())


def test_a_run_shows_its_networks_not_its_metrics_and_no_flops_it_did_not_count(tracking_uri, capfd):
    runner.run(MLP_DIGITS, QUICK + ["trainer.max_epochs=1", "tracking.system_metrics=false"],
               tracking_uri=tracking_uri, quiet=False)
    out, err = capfd.readouterr()
    table = err[err.index("Name"):err.index("params:")]
    assert "| net " in table and " MLP " in table  # ASCII: stderr is not a terminal here
    for bookkeeping in ("metrics", "train_stats", "EpochValue", "ModuleDict"):
        assert bookkeeping not in table
    assert "FLOPs" not in err and "FLOPs" not in out
    assert re.search(r"^params: [\d.]+ K trainable, 0 frozen \(0\.\d{3} MB\)$", err, re.MULTILINE), err
    assert "Name" not in out  # stdout keeps the results


class _Affine(L.LightningModule):
    """y = W x + b on 4 features into 3: a forward pass of one example is 2*4*3 = 24 FLOPs."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)
        self.acc = torchmetrics.MeanMetric()
        self.example_input_array = torch.zeros(1, 4)

    def forward(self, x):
        return self.layer(x)


def test_flops_are_shown_when_lightning_counted_them(capfd):
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    RunModelSummary().on_fit_start(trainer, _Affine())
    err = capfd.readouterr().err
    assert "FLOPs" in err[:err.index("params:")]  # the column
    assert "params: 15 trainable, 6 frozen" in err  # 4*3+3; 2*2+2
    assert err.strip().endswith("FLOPs of one forward pass: 24")
    assert "| layer " in err and "| frozen " in err and "acc" not in err
