"""Chapter 10 networks: plain nn.Modules (tensors in, tensors out, no Lightning).

- `NodeClassifierNet`: L message-passing layers in -> hidden -> ... -> num_classes, with
  sigma + dropout between layers (Kipf & Welling's 2-layer GCN: Z = softmax(Â ReLU(Â X W0) W1)).
- `GraphClassifierNet`: L layers of node representations, a readout (mean/sum/max over each graph's
  nodes) and a linear head: one logit vector per graph.
- `readout`, `mean_average_distance` (MAD, the over-smoothing measure).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litlab.chapters.gnn.layers import (
    Aggregator,
    GATLayer,
    GCNLayer,
    SAGELayer,
    gcn_norm,
    scatter_max,
    scatter_sum,
)

Conv = Literal["gcn", "sage", "gat"]
Readout = Literal["mean", "sum", "max"]
Activation = Literal["relu", "elu", "tanh"]

ACTIVATIONS = {"relu": F.relu, "elu": F.elu, "tanh": torch.tanh}


def build_layers(conv: Conv, dims: list[int], *, aggregator: Aggregator = "mean", normalize: bool = False,
                 heads: int = 1, output_heads: int = 1, attention_dropout: float = 0.0,
                 last_is_output: bool = True) -> nn.ModuleList:
    """One layer per step dims[k] -> dims[k+1]. For GAT, dims are per head: a hidden layer
    concatenates its `heads` heads (its output has heads * dims[k+1] features); the output layer
    (when `last_is_output`) averages `output_heads` heads, as in the paper."""
    layers = nn.ModuleList()
    width_in = dims[0]
    for k, width in enumerate(dims[1:]):
        last = last_is_output and k == len(dims) - 2
        if conv == "gcn":
            layers.append(GCNLayer(width_in, width))
        elif conv == "sage":
            # no L2 normalisation of the logits: it would cap them at norm 1
            layers.append(SAGELayer(width_in, width, aggregator, normalize=normalize and not last))
        elif conv == "gat":
            layers.append(GATLayer(width_in, width, heads=output_heads if last else heads, concat=not last,
                                   dropout=attention_dropout))
            width = width if last else heads * width
        else:
            raise ValueError(f"unknown conv {conv!r}")
        width_in = width
    return layers


class MessagePassingStack(nn.Module):
    """Applies layers in turn with sigma + dropout between them (not after the last when
    `activate_last` is False). GCN's Â is computed once per forward and shared by the layers."""

    def __init__(self, layers: nn.ModuleList, activation: Activation, dropout: float, activate_last: bool):
        super().__init__()
        self.layers, self.activation, self.dropout, self.activate_last = layers, ACTIVATIONS[activation], dropout, activate_last

    def forward(self, x: Tensor, edge_index: Tensor, neighbourhoods: tuple[int, int] | None = None) -> list[Tensor]:
        """x (N, F) -> the output of every layer [(N, F_1), ..., (N, F_L)]; `neighbourhoods`
        (data.graph_sampling.neighbourhood_shape) goes to the GraphSAGE layers."""
        norm = gcn_norm(edge_index, x.size(0)) if isinstance(self.layers[0], GCNLayer) else None
        h, outputs = x, []
        for k, layer in enumerate(self.layers):
            h = F.dropout(h, self.dropout, self.training)
            if norm is not None:
                h = layer(h, edge_index, norm=norm)
            elif isinstance(layer, SAGELayer):
                h = layer(h, edge_index, neighbourhoods)
            else:
                h = layer(h, edge_index)
            if k < len(self.layers) - 1 or self.activate_last:
                h = self.activation(h)
            outputs.append(h)
        return outputs


class NodeClassifierNet(nn.Module):
    """(x (N, F), edge_index (2, E)) -> logits (N, num_classes); `num_layers` layers, the last one
    maps to the classes (dropout before every layer, as in Kipf & Welling / GAT)."""

    def __init__(self, conv: Conv, in_features: int, num_classes: int, hidden: int = 16, num_layers: int = 2,
                 dropout: float = 0.5, activation: Activation = "relu", **layer_options):
        super().__init__()
        dims = [in_features] + [hidden] * (num_layers - 1) + [num_classes]
        self.stack = MessagePassingStack(build_layers(conv, dims, **layer_options), activation, dropout,
                                         activate_last=False)

    def forward(self, x: Tensor, edge_index: Tensor, return_hidden: bool = False,
                neighbourhoods: tuple[int, int] | None = None):
        """With return_hidden, also every layer's output [(N, F_k)] (the last one = the logits)."""
        outputs = self.stack(x, edge_index, neighbourhoods)
        return (outputs[-1], outputs) if return_hidden else outputs[-1]


def readout(h: Tensor, batch: Tensor, num_graphs: int, mode: Readout) -> Tensor:
    """Pool node representations h (N, F) into one vector per graph (G, F); batch[n] = graph of node n."""
    if mode == "sum":
        return scatter_sum(h, batch, num_graphs)
    if mode == "mean":
        # nodes per graph by index_add (bincount sizes its output from the values: a host sync)
        count = h.new_zeros(num_graphs).index_add_(0, batch, h.new_ones(batch.shape[0])).clamp_min(1)
        return scatter_sum(h, batch, num_graphs) / count[:, None]
    if mode == "max":
        return scatter_max(h, batch, num_graphs)
    raise ValueError(f"unknown readout {mode!r}")


class GraphClassifierNet(nn.Module):
    """(x (N, F), edge_index (2, E), batch (N,), num_graphs G) -> logits (G, num_classes):
    `num_layers` layers to `hidden` features (sigma after each), readout, dropout, linear head."""

    def __init__(self, conv: Conv, in_features: int, num_classes: int, hidden: int = 32, num_layers: int = 3,
                 readout: Readout = "mean", dropout: float = 0.0, activation: Activation = "relu", **layer_options):
        super().__init__()
        layers = build_layers(conv, [in_features] + [hidden] * num_layers, last_is_output=False, **layer_options)
        width = hidden * layer_options.get("heads", 1) if conv == "gat" else hidden
        self.stack = MessagePassingStack(layers, activation, dropout=0.0, activate_last=True)
        self.readout_mode, self.dropout = readout, dropout
        self.head = nn.Linear(width, num_classes)

    def embed(self, x: Tensor, edge_index: Tensor, batch: Tensor, num_graphs: int,
              neighbourhoods: tuple[int, int] | None = None) -> Tensor:
        """The graph representations (G, hidden) that the head classifies (`neighbourhoods`: see
        MessagePassingStack)."""
        return readout(self.stack(x, edge_index, neighbourhoods)[-1], batch, num_graphs, self.readout_mode)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor, num_graphs: int,
                neighbourhoods: tuple[int, int] | None = None) -> Tensor:
        g = self.embed(x, edge_index, batch, num_graphs, neighbourhoods)
        return self.head(F.dropout(g, self.dropout, self.training))


def mean_average_distance(h: Tensor) -> Tensor:
    """MAD (Chen et al. 2020): the mean cosine distance 1 - cos(h_i, h_j) over all pairs i != j.

    In O(N F) instead of O(N^2 F): with unit rows u_i, sum_{i != j} u_i . u_j = ||sum_i u_i||^2 - N.
    Rows of zeros (cosine undefined) are left out. 0 when all representations point the same way
    (over-smoothed), up to 2 when they point every which way."""
    h = h.detach().cpu().double()  # a metric, no gradient; float64: the sum below cancels
    norms = h.norm(dim=-1)
    u = h[norms > 0] / norms[norms > 0, None]  # (M, F)
    m = u.size(0)
    if m < 2:
        return h.new_zeros(())
    cos_sum = u.sum(0).pow(2).sum() - m  # sum over ordered pairs i != j of cos(h_i, h_j)
    return (1 - cos_sum / (m * (m - 1))).float()
