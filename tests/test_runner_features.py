"""Runner features beyond the basics: early stopping, model plots, the notebook API."""

from __future__ import annotations

import torch
from mlflow import MlflowClient

import litlab
from helpers import MLP_DIGITS, QUICK, REPO, metric_steps


def test_early_stopping_stops_before_max_epochs(tracking_uri):
    # A learning rate this small cannot improve val/acc by 0.5 in 2 epochs: stop after patience.
    result = litlab.run(MLP_DIGITS, QUICK + ["trainer.max_epochs=30", "optim.lr=1e-6",
                                             "callbacks.early_stopping.enabled=true",
                                             "callbacks.early_stopping.patience=2",
                                             "callbacks.early_stopping.min_delta=0.5",
                                             "tracking.system_metrics=false"], tracking_uri=tracking_uri)
    assert len(metric_steps(tracking_uri, result.run_id)["val/acc"]) == 3


def test_uat_logs_fit_vs_target_plot(tracking_uri):
    result = litlab.run(REPO / "experiments/mlp/uat_sine.yaml", ["trainer.max_epochs=2", "tracking.system_metrics=false"],
                        tracking_uri=tracking_uri)
    arts = {a.path for a in MlflowClient(tracking_uri=tracking_uri).list_artifacts(result.run_id, "plots")}
    assert {"plots/fit_vs_target.png", "plots/learning_curves.png"} <= arts


def test_load_returns_the_trained_module(tracking_uri):
    from litlab.data.digits import DigitsDataModule

    result = litlab.run(MLP_DIGITS, QUICK + ["tracking.system_metrics=false"], tracking_uri=tracking_uri)
    module = litlab.load(result.run_id, tracking_uri=tracking_uri)
    assert not module.training
    dm = DigitsDataModule()
    dm.setup("test")
    correct = total = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += (module(x).argmax(-1) == y).sum().item()
            total += len(y)
    assert abs(correct / total - result.metrics["test/acc"]) < 1e-6
