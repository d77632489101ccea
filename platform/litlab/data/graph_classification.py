"""Graph classification on generated graphs (chapter 10): one label per graph, mini-batches of graphs.

Tasks (2 classes, balanced, each graph's node order shuffled):
- `cycles_vs_trees`: a cycle C_n (class 0) or a uniformly random recursive tree on n nodes (class 1:
  node i attaches to a random earlier node). A cycle has n edges and every degree 2; a tree n - 1
  edges and at least two leaves. Easy for a GNN with a readout.
- `communities`: an SBM graph with ONE community (class 0, edge probability p) or TWO equal
  communities (class 1, p_in within, p_out between), p_in and p_out chosen so that the expected
  degree is the same; told apart by the structure (more triangles, a bottleneck), not the degree. Harder.

n is uniform in [min_nodes, max_nodes]. Node features: `constant` (x_i = 1, F = 1: only the structure
informs) or `degree` (one-hot degree, capped at 10, F = 11).

Batches are torch_geometric Batch objects from PyG's DataLoader: the graphs of a batch as one big
disconnected graph, x (N_total, F), edge_index (2, E_total), batch (N_total,) = graph of each node,
y (G,), num_graphs G. Split train/val/test by fractions, all seeded by `graph_seed` only.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from litlab.data.base import LitlabDataModule
from litlab.data.graph_sampling import neighbourhood_shape
from litlab.data.graphs import undirected_edge_index
from litlab.errors import ConfigError
from litlab.registry import register_data
from litlab.schema import Range

MAX_DEGREE = 10  # one-hot degree features: degrees >= 10 share the last slot


def cycle(n: int) -> Tensor:
    """Undirected edge pairs (n, 2) of the cycle 0-1-...-(n-1)-0."""
    i = torch.arange(n)
    return torch.stack([i, (i + 1) % n], dim=1)


def random_tree(n: int, gen: torch.Generator) -> Tensor:
    """Edge pairs (n-1, 2) of a random recursive tree: node i >= 1 attaches to a uniform j < i."""
    i = torch.arange(1, n)
    parent = (torch.rand(n - 1, generator=gen) * i).long()  # uniform in 0..i-1
    return torch.stack([parent, i], dim=1)


def sbm_pairs(sizes: list[int], p_in: float, p_out: float, gen: torch.Generator) -> Tensor:
    """Edge pairs (P, 2) of a stochastic block model with blocks of `sizes`."""
    block = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    n = int(block.numel())
    prob = torch.where(block[:, None] == block[None, :], p_in, p_out)
    return torch.nonzero((torch.rand(n, n, generator=gen) < prob).triu(1))


@register_data("synthetic_graphs", description="generated graph classification (seeded): cycles vs random trees, "
               "or SBM graphs with 1 vs 2 communities; mini-batches of graphs")
class SyntheticGraphsDataModule(LitlabDataModule):
    def __init__(
        self,
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 32,  # graphs per batch
        num_workers: Annotated[int, Range(ge=0, le=256)] = 0,
        task: Literal["cycles_vs_trees", "communities"] = "cycles_vs_trees",
        num_graphs: Annotated[int, Range(ge=6, le=1_000_000)] = 600,  # all splits together
        min_nodes: Annotated[int, Range(ge=3, le=10_000)] = 8,
        max_nodes: Annotated[int, Range(ge=3, le=10_000)] = 20,
        features: Literal["constant", "degree"] = "degree",
        mean_degree: Annotated[float, Range(gt=0, le=100)] = 4.0,  # communities: expected degree of both classes
        p_out_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1,  # communities: p_out / p_in of class 1
        val_fraction: Annotated[float, Range(gt=0.0, le=0.5)] = 0.2,
        test_fraction: Annotated[float, Range(gt=0.0, le=0.5)] = 0.2,
        graph_seed: Annotated[int, Range(ge=0, lt=2**32)] = 0,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if min_nodes > max_nodes:
            raise ConfigError("data.min_nodes", f"{min_nodes} > data.max_nodes={max_nodes}")
        self.task, self.num_graphs, self.min_nodes, self.max_nodes = task, num_graphs, min_nodes, max_nodes
        self.features, self.mean_degree, self.p_out_ratio = features, mean_degree, p_out_ratio
        self.val_fraction, self.test_fraction, self.graph_seed = val_fraction, test_fraction, graph_seed

    def info(self) -> dict[str, Any]:
        return {"in_features": 1 if self.features == "constant" else MAX_DEGREE + 1, "num_classes": 2}

    def make_graph(self, label: int, gen: torch.Generator):
        from torch_geometric.data import Data

        n = int(torch.randint(self.min_nodes, self.max_nodes + 1, (1,), generator=gen))
        if self.task == "cycles_vs_trees":
            pairs = cycle(n) if label == 0 else random_tree(n, gen)
        elif label == 0:
            pairs = sbm_pairs([n], min(1.0, self.mean_degree / (n - 1)), 0.0, gen)
        else:
            # two blocks a = n // 2, b = n - a; expected degree ~ p_in (n/2 - 1) + p_out n/2 = mean_degree
            a = n // 2
            p_in = min(1.0, self.mean_degree / (a - 1 + self.p_out_ratio * (n - a)))
            pairs = sbm_pairs([a, n - a], p_in, self.p_out_ratio * p_in, gen)
        relabel = torch.randperm(n, generator=gen)  # node order carries no information
        edge_index = undirected_edge_index(relabel[pairs]) if pairs.numel() else torch.zeros(2, 0, dtype=torch.long)
        if self.features == "constant":
            x = torch.ones(n, 1)
        else:
            deg = torch.bincount(edge_index[1], minlength=n).clamp_max(MAX_DEGREE)
            x = torch.nn.functional.one_hot(deg, MAX_DEGREE + 1).float()
        return Data(x=x, edge_index=edge_index, y=torch.tensor([label]), num_nodes=n)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        gen = torch.Generator().manual_seed(self.graph_seed)
        labels = torch.arange(self.num_graphs) % 2  # balanced
        graphs = [self.make_graph(int(label), gen) for label in labels[torch.randperm(self.num_graphs, generator=gen)]]
        n_test = max(1, round(self.test_fraction * self.num_graphs))
        n_val = max(1, round(self.val_fraction * self.num_graphs))
        self.test_set, self.val_set = graphs[:n_test], graphs[n_test:n_test + n_val]
        self.train_set = graphs[n_test + n_val:]

    def _loader(self, dataset, shuffle: bool):
        from torch_geometric.loader import DataLoader

        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() did not create this split")
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                            persistent_workers=self.num_workers > 0)
        loader.collate_fn = WithNeighbourhoods(loader.collate_fn)
        return loader


class WithNeighbourhoods:
    """PyG's collate, then the batch's `neighbourhoods` (graph_sampling.neighbourhood_shape), read on
    the host where the batch is made: GraphSAGE's LSTM aggregator lays the neighbourhoods out
    without reading the edges on the device (a host sync per layer)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, graphs):
        batch = self.collate(graphs)
        batch.neighbourhoods = neighbourhood_shape(batch.edge_index)
        return batch
