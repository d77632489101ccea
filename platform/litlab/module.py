"""Base LightningModules shared by the chapters.

`LitlabModule` owns what every model has in common: the optimiser and schedule built from the
config's `optim:` section (the runner sets `optim_config`), and `log_figure()` to every logger
that stores files. `ClassifierModule` adds the cross-entropy step and accuracy metrics; a chapter
only builds `self.net` (a plain nn.Module, tensors in, tensors out).

Metric names: `train/loss` (per step and per epoch), `train/acc`, `val/loss`, `val/acc`,
`test/loss`, `test/acc`. At the end of test, a classifier stores `plots/confusion_matrix.png`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.trainer.states import RunningStage

from litlab.epoch_stats import EpochValue, TrainEpochStats


class LitlabModule(L.LightningModule):
    optim_config: Any = None  # litlab.config.OptimConfig, set by the runner before fit

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets _current_fx_name around every hook call, ~40 times a training step; a plain
        # string never goes through nn.Module's parameter/buffer/submodule bookkeeping.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    __setattr__.plain_fx_name = True  # litlab.fast_loop may set _current_fx_name in the instance dict

    def is_logging_step(self) -> bool:
        """True in a training step whose on_step values Lightning sends to the loggers (every
        trainer.log_every_n_steps steps): log on_step-only values then, skip the call otherwise."""
        t = self._trainer
        if t is None:
            return False
        if t.fast_dev_run:
            return True
        if t.state.stage is RunningStage.TRAINING:  # should_update_logs without its two loop lookups
            n = t.log_every_n_steps
            return n != 0 and ((t.fit_loop.epoch_loop._batches_that_stepped + 1) % n == 0 or t.should_stop)
        return t._logger_connector.should_update_logs

    def log_step_metrics(self, metrics: dict[str, torch.Tensor], batch_size: int | None = None) -> None:
        """Per-step values (call it where is_logging_step() is True). When every logger is litlab's
        MlflowTracker they go to it as device tensors, with the epoch, at the step Lightning would
        log them: no host sync (the copy to the host lands later), and not in callback_metrics.
        Otherwise they go through self.log(on_step=True, on_epoch=False); without any logger
        (tracking off) nothing would read them, and they are dropped."""
        trainer, loggers = self._trainer, self.loggers
        if trainer is not None and not loggers:
            return
        if trainer is not None and all(hasattr(lg, "log_tensor_metrics") for lg in loggers):
            step = trainer.fit_loop.epoch_loop._batches_that_stepped  # what Lightning's log_metrics uses
            for logger in loggers:
                logger.log_tensor_metrics({**metrics, "epoch": trainer.current_epoch}, step)
            return
        for name, value in metrics.items():
            self.log(name, value, on_step=True, on_epoch=False, batch_size=batch_size)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """trainer.gradient_clip_val, clipped here with torch's foreach kernels. Lightning's own path
        refuses a fused optimiser under mixed precision (the fused step unscales the gradients
        itself); here a grad scaler's gradients are unscaled first, which the fused step accepts."""
        if not gradient_clip_val:
            return
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        if not isinstance(self.trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):  # sharded: Lightning's way
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # 16-mixed + fused: Lightning left them scaled for the fused step
        if str(gradient_clip_algorithm).lower().endswith("value"):
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
        else:  # g <- g * min(1, c / ||g||_2), ||g|| over all parameters together
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)

    def configure_optimizers(self):
        from litlab.config import OptimConfig
        from litlab.optim import build_optimizer, build_scheduler

        cfg = self.optim_config or OptimConfig()
        optimizer = build_optimizer(self, cfg)
        scheduler = build_scheduler(
            optimizer,
            cfg.scheduler,
            total_steps=max(1, int(self.trainer.estimated_stepping_batches)),
            max_epochs=max(1, int(self.trainer.max_epochs or 1)),
        )
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def log_figure(self, figure, artifact_file: str) -> None:
        """Store a matplotlib figure with every logger that can (MLflow, W&B); rank 0 only."""
        if self.trainer is not None and not self.trainer.is_global_zero:
            return
        for logger in self.loggers:
            if hasattr(logger, "log_figure"):
                logger.log_figure(figure, artifact_file)


class AccuracyWithConfusion(torchmetrics.classification.MulticlassConfusionMatrix):
    """A running confusion matrix C[true, predicted] whose compute() is the micro accuracy
    trace(C) / sum(C) (= MulticlassAccuracy(average="micro")): the test accuracy and the confusion
    matrix plot come from one accumulation. update() takes logits (B, K, ...) or labels (B, ...)
    and adds with index_add_ on the device: no bincount (on CUDA it syncs with the host to size its
    output) and no value validation (it syncs too; cross-entropy has checked the labels already)."""

    full_state_update = False

    def __init__(self, num_classes: int):
        super().__init__(num_classes=num_classes, validate_args=False)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.is_floating_point() and preds.ndim == target.ndim + 1:
            preds = preds.argmax(1)  # logits (B, K, ...) -> labels (B, ...)
        cell = target.reshape(-1).long() * self.num_classes + preds.reshape(-1).long()  # row-major (true, pred)
        self.confmat.view(-1).index_add_(0, cell, torch.ones_like(cell))

    def compute(self) -> torch.Tensor:
        return self.confmat.diagonal().sum().float() / self.confmat.sum().clamp_min(1)

    def matrix(self) -> torch.Tensor:
        """The confusion matrix (K, K) summed over all ranks (every rank must call this)."""
        with self.sync_context():
            return self.confmat.clone()


def class_names(datamodule, num_classes: int) -> list[str]:
    """Names of the classes: the datamodule's `class_names`, its HF label feature's names, or indices."""
    names = getattr(datamodule, "class_names", None)
    if names is None:
        try:
            names = datamodule.hf_splits["train"].features["label"].names
        except (AttributeError, KeyError, TypeError):
            names = None
    names = list(names) if names is not None else []
    return [str(n) for n in names] if len(names) == num_classes else [str(i) for i in range(num_classes)]


class ClassifierModule(LitlabModule):
    """Cross-entropy classification over batches (x, y); subclasses set `self.net`. The test
    accuracy is accumulated as a confusion matrix, stored as plots/confusion_matrix.png at the end."""

    net: torch.nn.Module

    def __init__(self, num_classes: int):
        super().__init__()
        self.metrics = torch.nn.ModuleDict(
            {
                stage: torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")
                for stage in ("train_acc", "val_acc")
            }
        )
        self.metrics["test_acc"] = AccuracyWithConfusion(num_classes)
        self.train_stats = TrainEpochStats()  # train/loss and train/acc without a self.log per step
        self.train_loss_epoch, self.train_acc_epoch = EpochValue(self.train_stats, 0), EpochValue(self.train_stats, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, ...) -> logits (B, num_classes)

    def penalty(self) -> torch.Tensor | float:
        """Extra regularisation added to the training loss (e.g. L1/L2); 0 by default."""
        return 0.0

    def _shared_step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        if stage == "train":
            self.log_train_step(loss, logits, y)
            return loss
        acc = self.metrics[f"{stage}_acc"]
        acc.update(logits.detach(), y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss.detach(), on_step=on_step, on_epoch=True, prog_bar=stage == "val",
                 sync_dist=stage != "train")
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch, batch_idx):
        loss, penalty = self._shared_step(batch, "train"), self.penalty()
        return loss if isinstance(penalty, float) and penalty == 0.0 else loss + penalty  # no "+ 0.0" node

    def log_train_step(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """train/loss_step at the steps Lightning sends to the loggers (every log_every_n_steps);
        the step's loss and accuracy into the epoch's sums (one kernel)."""
        self.train_stats.add(loss, logits, y)
        if self.is_logging_step():
            self.log_step_metrics({"train/loss_step": loss.detach()}, batch_size=y.shape[0])

    def on_train_epoch_start(self):
        self._log_epoch_values()

    def on_train_start(self):
        if getattr(self.trainer.fit_loop, "restarted_mid_epoch", False):  # no on_train_epoch_start for it
            self._log_epoch_values()

    def _log_epoch_values(self) -> None:
        """train/loss_epoch and train/acc (and train/loss, for callbacks), logged as metrics that
        Lightning computes once the epoch's batches are done (and resets with the sums): no step
        pays for the epoch values, an epoch cut short (max_steps) gets those of its batches, and
        callbacks see them in callback_metrics at on_train_epoch_end as if logged in each step."""
        self.log("train/loss_epoch", self.train_loss_epoch, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_acc_epoch, on_step=False, on_epoch=True)
        self.log("train/loss", self.train_loss_epoch, on_step=False, on_epoch=True, logger=False)

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(-1)

    def on_test_epoch_end(self):
        self.log_confusion_matrix()

    def log_confusion_matrix(self) -> None:
        """plots/confusion_matrix.png of the test set: one read of the accumulated matrix."""
        metric = self.metrics["test_acc"]
        if not isinstance(metric, AccuracyWithConfusion) or not metric.update_called or self.trainer is None:
            return
        matrix = metric.matrix().cpu()  # (K, K), all ranks
        if not self.trainer.is_global_zero or not self.loggers:
            return
        import matplotlib.pyplot as plt

        from litlab.plots import confusion_matrix_figure

        names = class_names(getattr(self.trainer, "datamodule", None), matrix.shape[0])
        fig = confusion_matrix_figure(matrix, names, title=f"test confusion matrix ({type(self).__name__})")
        self.log_figure(fig, "plots/confusion_matrix.png")
        plt.close(fig)


def log_text(module: LitlabModule, text: str, artifact_file: str) -> None:
    """Store `text` as the file `artifact_file` (e.g. "samples/generated.txt") with every logger
    that stores files; rank 0 only. A logger with MLflow's log_text(text, artifact_file) gets that;
    one with only log_artifact(local_path, artifact_path) (litlab's MlflowTracker) gets a temp file."""
    if module._trainer is not None and not module.trainer.is_global_zero:
        return
    from lightning.pytorch.loggers import WandbLogger

    for lg in module.loggers:
        if isinstance(lg, WandbLogger):  # its log_text logs a table: (key, columns, data)
            lg.log_text(key=artifact_file, columns=["text"], data=[[text]])
        elif hasattr(lg, "log_text"):
            lg.log_text(text, artifact_file)
        elif hasattr(lg, "log_artifact"):
            folder, name = os.path.split(artifact_file)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, name)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
                lg.log_artifact(path, folder or None)
