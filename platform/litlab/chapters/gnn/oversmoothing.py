"""`gnn_depth_sweep`: over-smoothing, accuracy and representation distance against depth, in ONE run.

Every GCN layer averages each node with its neighbours (Â is a low-pass filter): stack many and the
node representations converge to a vector that depends only on the node's degree, whatever its
features (Li et al. 2018; Oono & Suzuki 2020), so classes can no longer be told apart.

The module holds one independent network per depth L in `depths` (default 1, 2, 4, 8, 16), all
trained side by side on the same graph batches: the loss is the SUM of their losses, so each net's
gradient is exactly the one it would get alone (no shared parameters). One Trainer, one MLflow run,
one checkpoint (chosen by the mean val/loss over depths).

Logged: {stage}/loss_L{L}, {stage}/acc_L{L} per depth, {stage}/loss and {stage}/acc (means over the
depths), test/mad_L{L} (MAD of the output layer of the L-layer net, nets.mean_average_distance)
and the figure plots/oversmoothing.png: train/test accuracy and MAD against L, plus the MAD after
each layer k of the deepest net, trained and at initialisation (how the collapse builds up layer by
layer: at init it shrinks geometrically with k, Â alone does it).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from litlab.chapters.gnn.module import (
    CHAPTER,
    SMOKE_SBM,
    Dropout,
    Hidden,
    InFeatures,
    NumClasses,
)
from litlab.chapters.gnn.nets import (
    Activation,
    Conv,
    NodeClassifierNet,
    mean_average_distance,
)
from litlab.chapters.gnn.plots import oversmoothing_figure
from litlab.errors import ConfigError
from litlab.registry import register_model
from litlab.schema import Range
from litlab.steps import StageSteps

Depth = Annotated[int, Range(ge=1, le=128)]


def masked_accuracy(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hits = (logits.argmax(-1) == y) & mask
    return hits.sum() / mask.sum().clamp_min(1)


@register_model(
    "gnn_depth_sweep", chapter=CHAPTER,
    description="over-smoothing: trains GCNs of 1, 2, 4, 8, 16 layers side by side; plots accuracy and mean "
                "pairwise distance (MAD) of the node representations against depth",
    smoke={"model": {"depths": [1, 3], "hidden": 4}, "data": SMOKE_SBM},
)
class GNNDepthSweep(StageSteps):
    def __init__(
        self,
        in_features: InFeatures,
        num_classes: NumClasses,
        depths: tuple[Depth, ...] = (1, 2, 4, 8, 16),
        conv: Conv = "gcn",  # gat: one head per layer
        hidden: Hidden = 16,
        dropout: Dropout = 0.5,
        activation: Activation = "relu",
    ):
        super().__init__()
        if not depths or len(set(depths)) != len(depths):
            raise ConfigError("model.depths", f"{list(depths)}: give distinct depths, e.g. [1, 2, 4, 8, 16]")
        self.save_hyperparameters()
        self.depths = sorted(depths)
        self.nets = torch.nn.ModuleList(
            NodeClassifierNet(conv, in_features, num_classes, hidden, depth, dropout, activation) for depth in self.depths)
        self._test_results: dict | None = None
        self.mad_by_layer_init: list[float] | None = None

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Logits of every depth, stacked: (len(depths), N, C)."""
        return torch.stack([net(x, edge_index) for net in self.nets])

    def smoke_forward(self, batch) -> torch.Tensor:
        return self(batch.x, batch.edge_index)

    def _step(self, batch, stage: str) -> torch.Tensor:
        mask = batch[f"{stage}_mask"]
        weight = mask.float()
        losses, accs = [], []
        for depth, net in zip(self.depths, self.nets):
            logits, outputs = net(batch.x, batch.edge_index, return_hidden=True)
            loss = (F.cross_entropy(logits, batch.y, reduction="none") * weight).sum() / weight.sum().clamp_min(1)
            acc = masked_accuracy(logits.detach(), batch.y, mask)
            losses.append(loss)
            accs.append(acc)
            self.log(f"{stage}/loss_L{depth}", loss.detach(), on_step=False, on_epoch=True, batch_size=1)
            self.log(f"{stage}/acc_L{depth}", acc, on_step=False, on_epoch=True, batch_size=1)
            if stage == "test":
                self._record(depth, logits, outputs, batch)
        self.log(f"{stage}/loss", torch.stack(losses).detach().mean(), on_step=False, on_epoch=True, batch_size=1,
                 prog_bar=stage == "val")
        self.log(f"{stage}/acc", torch.stack(accs).mean(), on_step=False, on_epoch=True, batch_size=1,
                 prog_bar=stage == "val")
        return torch.stack(losses).sum()  # independent nets: each gets its own gradient

    def _record(self, depth: int, logits: torch.Tensor, outputs: list[torch.Tensor], batch) -> None:
        mad = mean_average_distance(logits)
        self.log(f"test/mad_L{depth}", mad, batch_size=1)
        r = self._test_results
        r["train_acc"].append(float(masked_accuracy(logits, batch.y, batch.train_mask)))
        r["test_acc"].append(float(masked_accuracy(logits, batch.y, batch.test_mask)))
        r["mad"].append(float(mad))
        if depth == self.depths[-1]:
            r["mad_by_layer"] = [float(mean_average_distance(h)) for h in outputs]


    def on_train_start(self):
        """MAD after each layer of the deepest net before any update: smoothing by Â alone."""
        if self.mad_by_layer_init is not None or not self.trainer.is_global_zero:
            return
        graph = self.trainer.datamodule.graph if hasattr(self.trainer.datamodule, "graph") else None
        if graph is None:
            return
        was_training = self.training
        self.eval()
        with torch.no_grad():
            _, outputs = self.nets[-1](graph.x.to(self.device), graph.edge_index.to(self.device), return_hidden=True)
        self.mad_by_layer_init = [float(mean_average_distance(h)) for h in outputs]
        self.train(was_training)

    def on_test_epoch_start(self):
        self._test_results = {"train_acc": [], "test_acc": [], "mad": [], "mad_by_layer": []}

    def on_test_epoch_end(self):
        r = self._test_results
        if r and r["mad"] and self.trainer.is_global_zero and any(hasattr(lg, "log_figure") for lg in self.loggers):
            n = len(self.depths)  # one full-graph test batch: the first n records
            fig = oversmoothing_figure(self.depths, {"train": r["train_acc"][:n], "test": r["test_acc"][:n]},
                                       r["mad"][:n], r["mad_by_layer"], self.mad_by_layer_init,
                                       f"{self.hparams.conv.upper()}: accuracy against depth")
            self.log_figure(fig, "plots/oversmoothing.png")

    def on_test_end(self):
        self.test_results = self._test_results  # kept for notebooks/tests: accuracies and MADs by depth

    def predict_step(self, batch, batch_idx):
        return self(batch.x, batch.edge_index).argmax(-1)  # (len(depths), N)
