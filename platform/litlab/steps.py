"""Step patterns shared by several modules: one `_step(batch, stage)` for the three stages, and
the next-token language-model step (GPT, the character RNNs)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from litlab.module import LitlabModule


class StageSteps(LitlabModule):
    """training/validation/test steps that are one `_step(batch, stage)` with stage "train", "val"
    or "test"; the training step returns its loss."""

    def _step(self, batch, stage: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")


def bits_per_token(loss_nats: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats per token -> bits per token (bpc for characters): loss / ln 2."""
    return loss_nats / math.log(2)


class NextTokenSteps(StageSteps):
    """The steps of a next-token language model: ids x (B, T) -> logits (B, T, V) against the
    shifted ids y (B, T); {stage}/loss (nats per token) and {stage}/bpc, and whatever
    `log_step_extras` adds (e.g. perplexity)."""

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch  # (B, T) each
        logits = self(x)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))  # nats per token
        train = stage == "train"
        self.log(f"{stage}/loss", loss.detach(), on_step=train, on_epoch=True, prog_bar=stage == "val",
                 sync_dist=not train)
        self.log(f"{stage}/bpc", bits_per_token(loss.detach()), on_step=False, on_epoch=True,
                 prog_bar=stage == "val", sync_dist=not train)
        self.log_step_extras(stage, loss.detach(), y)
        return loss

    def log_step_extras(self, stage: str, loss: torch.Tensor, y: torch.Tensor) -> None:
        pass
