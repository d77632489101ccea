"""Chapter 10 LightningModules for node classification: `gcn`, `graphsage`, `gat`.

A batch is a torch_geometric Data: the whole graph (full-graph training, one step per epoch) or a
subgraph sampled around a mini-batch of seed nodes (data.fanout). Each stage scores only its own
nodes, `batch.<stage>_mask`: the loss is the mean cross-entropy over those nodes (a masked mean,
no host sync) and accuracy ignores the other nodes.

Logged: {train,val,test}/loss and /acc; at test time test/mad (MAD, the mean pairwise cosine
distance of the output layer's node representations: see nets.mean_average_distance) and the
figure plots/embeddings.png, the 2-D PCA (or t-SNE) of the node representations before the
output layer (after the last hidden layer), coloured by class, labelled training nodes circled.
The runner tests the best checkpoint, so the figure shows that model.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from litlab.chapters.gnn.nets import (
    Activation,
    NodeClassifierNet,
    mean_average_distance,
)
from litlab.chapters.gnn.plots import Projection, embedding_figure
from litlab.epoch_stats import DeviceMean
from litlab.registry import register_model
from litlab.schema import Range
from litlab.steps import StageSteps

CHAPTER = "10 Graph neural networks"

InFeatures = Annotated[int, Range(ge=1, le=10_000_000)]
NumClasses = Annotated[int, Range(ge=2, le=100_000)]
Hidden = Annotated[int, Range(ge=1, le=65_536)]
Layers = Annotated[int, Range(ge=1, le=128)]
Dropout = Annotated[float, Range(ge=0.0, lt=1.0)]
Heads = Annotated[int, Range(ge=1, le=64)]

SMOKE_SBM = {"name": "sbm", "num_blocks": 2, "block_size": 12, "p_in": 0.4, "p_out": 0.05, "labels_per_class": 3}


class NodeClassifierModule(StageSteps):
    """Shared steps of the node classifiers; subclasses build `self.net` (a NodeClassifierNet)."""

    net: NodeClassifierNet

    def __init__(self, num_classes: int, embedding_plot: Projection = "pca"):
        super().__init__()
        self.embedding_plot = embedding_plot
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_acc": DeviceMean()  # accuracy over the stage's nodes: hits weighted by the mask
            for stage in ("train", "val", "test")})
        self._test_outputs: list = []

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, neighbourhoods: tuple[int, int] | None = None):
        return self.net(x, edge_index, neighbourhoods=neighbourhoods)  # (N, F), (2, E) -> logits (N, C)

    def smoke_forward(self, batch) -> torch.Tensor:
        return self(batch.x, batch.edge_index, neighbourhoods_of(batch))

    def _step(self, batch, stage: str) -> torch.Tensor:
        logits, outputs = self.net(batch.x, batch.edge_index, return_hidden=True, neighbourhoods=neighbourhoods_of(batch))
        mask = batch[f"{stage}_mask"]
        weight = mask.to(logits.dtype)
        loss = (F.cross_entropy(logits, batch.y, reduction="none") * weight).sum() / weight.sum().clamp_min(1)
        acc = self.metrics[f"{stage}_acc"]
        acc.update(logits.detach().argmax(-1) == batch.y, weight=weight)  # no selection: no host sync
        size = batch.batch_size if "batch_size" in batch else 1  # seed nodes of a sampled batch; 1 graph
        self.log(f"{stage}/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=stage == "val",
                 batch_size=size, sync_dist=stage != "train")
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=size)
        if stage == "test":
            self.log("test/mad", mean_average_distance(logits), batch_size=size)
            hidden = outputs[-2] if len(outputs) > 1 else logits
            self._test_outputs.append((hidden.detach().cpu(), batch.y.cpu(), batch.train_mask.cpu()))
        return loss


    def on_test_epoch_start(self):
        self._test_outputs = []

    def on_test_epoch_end(self):
        if self.embedding_plot == "none" or not self._test_outputs:
            return
        if self.trainer.is_global_zero and any(hasattr(lg, "log_figure") for lg in self.loggers):
            hidden, y, train = self._test_outputs[0]
            what = "hidden layer" if len(self.net.stack.layers) > 1 else "output layer"
            title = f"{self.registry_name}: node representations ({what})"
            self.log_figure(embedding_figure(hidden, y, title, self.embedding_plot, train), "plots/embeddings.png")
        self._test_outputs = []

    def predict_step(self, batch, batch_idx):
        return self(batch.x, batch.edge_index, neighbourhoods_of(batch)).argmax(-1)


def neighbourhoods_of(batch) -> tuple[int, int] | None:
    """The batch's graph_sampling.neighbourhood_shape, where the data module or sampler put it."""
    return batch.neighbourhoods if "neighbourhoods" in batch else None


@register_model(
    "gcn", chapter=CHAPTER,
    description="graph convolutional network (Kipf & Welling): H' = sigma(D^-1/2 (A+I) D^-1/2 H W), node classification",
    smoke={"model": {"hidden": 8}, "data": {"name": "karate"}},
)
class GCNNodeClassifier(NodeClassifierModule):
    def __init__(
        self,
        in_features: InFeatures,
        num_classes: NumClasses,
        hidden: Hidden = 16,
        num_layers: Layers = 2,  # the last layer maps to the classes
        dropout: Dropout = 0.5,  # on every layer's input
        activation: Activation = "relu",
        embedding_plot: Projection = "pca",
    ):
        super().__init__(num_classes, embedding_plot)
        self.save_hyperparameters()
        self.net = NodeClassifierNet("gcn", in_features, num_classes, hidden, num_layers, dropout, activation)


@register_model(
    "graphsage", chapter=CHAPTER,
    description="GraphSAGE (Hamilton et al.): h' = W [h || AGG(neighbours)], mean/max/pool/LSTM aggregators, "
                "neighbour sampling via data.fanout",
    smoke={"model": {"hidden": 8, "aggregator": "lstm"}, "data": {**SMOKE_SBM, "fanout": [3, 2], "batch_size": 4}},
)
class GraphSAGENodeClassifier(NodeClassifierModule):
    def __init__(
        self,
        in_features: InFeatures,
        num_classes: NumClasses,
        hidden: Hidden = 32,
        num_layers: Layers = 2,
        aggregator: Literal["mean", "max", "pool", "lstm"] = "mean",  # lstm: neighbours in ascending id order
        normalize: bool = True,  # h' / ||h'||_2 after each hidden layer (the paper's line 7)
        dropout: Dropout = 0.5,
        activation: Activation = "relu",
        embedding_plot: Projection = "pca",
    ):
        super().__init__(num_classes, embedding_plot)
        self.save_hyperparameters()
        self.net = NodeClassifierNet("sage", in_features, num_classes, hidden, num_layers, dropout, activation,
                                     aggregator=aggregator, normalize=normalize)


@register_model(
    "gat", chapter=CHAPTER,
    description="graph attention network (Velickovic et al.): multi-head attention over each neighbourhood, "
                "heads concatenated (hidden) or averaged (output)",
    smoke={"model": {"hidden": 4, "heads": 2}, "data": SMOKE_SBM},
)
class GATNodeClassifier(NodeClassifierModule):
    def __init__(
        self,
        in_features: InFeatures,
        num_classes: NumClasses,
        hidden: Hidden = 8,  # features per head; a hidden layer outputs heads * hidden
        heads: Heads = 8,
        output_heads: Heads = 1,  # averaged in the output layer
        num_layers: Layers = 2,
        dropout: Dropout = 0.6,  # on every layer's input
        attention_dropout: Dropout = 0.6,  # on the attention coefficients alpha_ij
        activation: Activation = "elu",
        embedding_plot: Projection = "pca",
    ):
        super().__init__(num_classes, embedding_plot)
        self.save_hyperparameters()
        self.net = NodeClassifierNet("gat", in_features, num_classes, hidden, num_layers, dropout, activation,
                                     heads=heads, output_heads=output_heads, attention_dropout=attention_dropout)
