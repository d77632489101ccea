"""Base LightningModules shared by the chapters.

`LitlabModule` owns what every model has in common: the optimiser and schedule built from the
config's `optim:` section (the runner sets `optim_config`), and `log_figure()` to every logger
that stores files. `ClassifierModule` adds the cross-entropy step and accuracy metrics; a chapter
only builds `self.net` (a plain nn.Module, tensors in, tensors out).

Metric names: `train/loss` (per step and per epoch), `train/acc`, `val/loss`, `val/acc`,
`test/loss`, `test/acc`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics


class LitlabModule(L.LightningModule):
    optim_config: Any = None  # litlab.config.OptimConfig, set by the runner before fit

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


class ClassifierModule(LitlabModule):
    """Cross-entropy classification over batches (x, y); subclasses set `self.net`."""

    net: torch.nn.Module

    def __init__(self, num_classes: int):
        super().__init__()
        self.metrics = torch.nn.ModuleDict(
            {
                stage: torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")
                for stage in ("train_acc", "val_acc", "test_acc")
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, ...) -> logits (B, num_classes)

    def penalty(self) -> torch.Tensor | float:
        """Extra regularisation added to the training loss (e.g. L1/L2); 0 by default."""
        return 0.0

    def _shared_step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = self.metrics[f"{stage}_acc"]
        acc.update(logits.detach(), y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss.detach(), on_step=on_step, on_epoch=True, prog_bar=stage == "val",
                 sync_dist=stage != "train")
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train") + self.penalty()

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(-1)
