"""`graph_classifier`: one label per graph. L message-passing layers give node representations,
a readout pools each graph's nodes into one vector (mean / sum / max: permutation invariant), a
linear head classifies it.

Batches are torch_geometric Batch objects (several graphs as one disconnected graph, `batch.batch`
maps nodes to graphs). Logged: {train,val,test}/loss and /acc (per graph); at test time the figure
plots/embeddings.png, the 2-D PCA (or t-SNE) of the test graphs' pooled representations by class.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import torchmetrics

from litlab.chapters.gnn.module import (
    CHAPTER,
    Dropout,
    Heads,
    Hidden,
    InFeatures,
    Layers,
    NumClasses,
    neighbourhoods_of,
)
from litlab.chapters.gnn.nets import Activation, Conv, GraphClassifierNet, Readout
from litlab.chapters.gnn.plots import Projection, embedding_figure
from litlab.registry import register_model
from litlab.steps import StageSteps


@register_model(
    "graph_classifier", chapter=CHAPTER,
    description="graph classification: GCN/GraphSAGE/GAT layers, mean/sum/max readout over each graph's nodes, "
                "linear head; mini-batches of graphs",
    smoke={"model": {"hidden": 8, "num_layers": 2}, "data": {"name": "synthetic_graphs", "num_graphs": 12,
                                                               "batch_size": 4, "max_nodes": 10}},
)
class GraphClassifier(StageSteps):
    def __init__(
        self,
        in_features: InFeatures,
        num_classes: NumClasses,
        conv: Conv = "gcn",
        hidden: Hidden = 32,
        num_layers: Layers = 3,
        readout: Readout = "mean",
        aggregator: Literal["mean", "max", "pool", "lstm"] = "mean",  # conv=sage only
        heads: Heads = 1,  # conv=gat only: heads concatenated in every layer
        dropout: Dropout = 0.0,  # on the pooled graph representation
        activation: Activation = "relu",
        embedding_plot: Projection = "pca",
    ):
        super().__init__()
        self.save_hyperparameters()
        options = {"sage": {"aggregator": aggregator}, "gat": {"heads": heads}}.get(conv, {})
        self.net = GraphClassifierNet(conv, in_features, num_classes, hidden, num_layers, readout, dropout,
                                      activation, **options)
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_acc": torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
            for stage in ("train", "val", "test")})
        self._test_embeddings: list = []

    def forward(self, batch) -> torch.Tensor:
        """A Batch of G graphs -> logits (G, C)."""
        return self.net(batch.x, batch.edge_index, batch.batch, batch.num_graphs, neighbourhoods_of(batch))

    def smoke_forward(self, batch) -> torch.Tensor:
        return self(batch)

    def _step(self, batch, stage: str) -> torch.Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits, batch.y)
        acc = self.metrics[f"{stage}_acc"]
        acc.update(logits.detach(), batch.y)
        size = batch.num_graphs
        self.log(f"{stage}/loss", loss.detach(), on_step=stage == "train", on_epoch=True, prog_bar=stage == "val",
                 batch_size=size, sync_dist=stage != "train")
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=size)
        return loss


    def test_step(self, batch, batch_idx):
        self._step(batch, "test")
        if self.hparams.embedding_plot != "none":
            g = self.net.embed(batch.x, batch.edge_index, batch.batch, batch.num_graphs, neighbourhoods_of(batch))  # (G, hidden)
            self._test_embeddings.append((g.detach().cpu(), batch.y.cpu()))

    def on_test_epoch_start(self):
        self._test_embeddings = []

    def on_test_epoch_end(self):
        if self._test_embeddings and self.trainer.is_global_zero and any(hasattr(lg, "log_figure")
                                                                         for lg in self.loggers):
            g = torch.cat([e for e, _ in self._test_embeddings])
            y = torch.cat([t for _, t in self._test_embeddings])
            title = f"graph_classifier ({self.hparams.conv}, {self.hparams.readout} readout): test graphs"
            self.log_figure(embedding_figure(g, y, title, self.hparams.embedding_plot), "plots/embeddings.png")
        self._test_embeddings = []

    def predict_step(self, batch, batch_idx):
        return self(batch).argmax(-1)
