"""Node classification on one graph (chapter 10): Zachary's karate club, stochastic block models,
Planetoid (Cora / CiteSeer / PubMed).

Full-graph training (the default): the graph is ONE batch. Every loader (train, val, test) yields
the same torch_geometric `Data` (x (N, F), y (N,), edge_index (2, E) with both directions of each
undirected edge, train_mask / val_mask / test_mask (N,) bool), so an epoch is one optimiser step;
the model computes every node's output and takes the loss/accuracy of the stage's mask only
(semi-supervised: the features and edges of val/test nodes are seen, their labels are not).

Mini-batch training (GraphSAGE): with `fanout: [k1, k2, ...]` (one per layer) the train loader
yields subgraphs sampled around `batch_size` training seed nodes (litlab.data.graph_sampling);
val/test stay full-graph. `batch_size` is only used with a fan-out.

`steps_per_epoch` (full-graph training): the train loader yields the graph that many times per
epoch, so a run of many steps validates (and checkpoints) every `steps_per_epoch` steps instead of
after every single step; on small graphs that bookkeeping costs more than the step itself.

info() -> {"in_features": F, "num_classes": C}, which fill the model's arguments of those names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from litlab.data.base import LitlabDataModule
from litlab.data.graph_sampling import NeighborSampler, neighbourhood_shape
from litlab.errors import ConfigError, UserError
from litlab.registry import register_data
from litlab.schema import Range

BatchSize = Annotated[int, Range(ge=1, le=1_000_000)]
Workers = Annotated[int, Range(ge=0, le=256)]
Fanout = list[Annotated[int, Range(ge=-1, le=100_000)]] | None  # None: full-graph training; -1: all neighbours
Seed = Annotated[int, Range(ge=0, lt=2**32)]
LabelsPerClass = Annotated[int, Range(ge=1, le=100_000)]
ValFraction = Annotated[float, Range(ge=0.0, lt=1.0)]
StepsPerEpoch = Annotated[int, Range(ge=1, le=100_000)]  # full-graph training: steps (graph passes) per epoch


def single_item(items: list) -> Any:
    """collate_fn of the full-graph loaders: the one graph, as it is."""
    return items[0]


def split_masks(y: Tensor, labels_per_class: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Planetoid-style semi-supervised split: `labels_per_class` random training nodes per class;
    of the others, `val_fraction` (random) for validation and the rest for test. Seeded by `seed` only."""
    g = torch.Generator().manual_seed(seed)
    n = y.numel()
    train = torch.zeros(n, dtype=torch.bool)
    for c in y.unique():
        members = torch.nonzero(y == c).squeeze(1)
        if members.numel() <= labels_per_class:
            raise ConfigError("data.labels_per_class", f"{labels_per_class} but class {int(c)} has only "
                              f"{members.numel()} nodes: leave some for validation and test")
        train[members[torch.randperm(members.numel(), generator=g)[:labels_per_class]]] = True
    rest = torch.nonzero(~train).squeeze(1)
    rest = rest[torch.randperm(rest.numel(), generator=g)]
    n_val = min(round(val_fraction * rest.numel()), rest.numel() - 1)  # keep at least one test node
    val, test = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    val[rest[:n_val]] = True
    test[rest[n_val:]] = True
    return train, val, test


class NodeGraphDataModule(LitlabDataModule):
    """Base: subclasses implement `build_graph()` (-> Data with x, y, edge_index and the 3 masks) and `info()`."""

    graph = None

    def __init__(self, batch_size: BatchSize = 64, num_workers: Workers = 0, fanout: Fanout = None,
                 steps_per_epoch: StepsPerEpoch = 1):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if fanout is not None and (not fanout or 0 in fanout):
            raise ConfigError("data.fanout", f"{fanout}: one positive count (or -1 = all) per layer, e.g. [10, 10]")
        self.fanout, self.steps_per_epoch = fanout, steps_per_epoch

    def build_graph(self):
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.graph is None:
            self.graph = self.build_graph()
            # read once here, so that GraphSAGE's LSTM aggregator reads nothing during a step
            self.graph.neighbourhoods = neighbourhood_shape(self.graph.edge_index)

    def _graph_loader(self, repeat: int = 1) -> DataLoader:
        if self.graph is None:
            raise RuntimeError(f"{type(self).__name__}.setup() was not called")
        return DataLoader([self.graph] * repeat, batch_size=1, collate_fn=single_item)

    def train_dataloader(self) -> DataLoader:
        if self.fanout is None:
            return self._graph_loader(self.steps_per_epoch)
        seeds = torch.nonzero(self.graph.train_mask).squeeze(1).tolist()
        return DataLoader(seeds, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0,
                          collate_fn=NeighborSampler(self.graph, self.fanout))

    def val_dataloader(self) -> DataLoader:
        return self._graph_loader()

    def test_dataloader(self) -> DataLoader:
        return self._graph_loader()


def _data(x: Tensor, y: Tensor, edge_index: Tensor, masks: tuple[Tensor, Tensor, Tensor], **extra):
    from torch_geometric.data import Data

    train, val, test = masks
    return Data(x=x, y=y, edge_index=edge_index, train_mask=train, val_mask=val, test_mask=test,
                num_nodes=y.numel(), **extra)


def undirected_edge_index(pairs: Tensor) -> Tensor:
    """Pairs (P, 2) of undirected edges -> edge_index (2, 2P) with both directions."""
    return torch.cat([pairs.t(), pairs.flip(1).t()], dim=1).long()


# ------------------------------------------------------------------------------------ karate club
@register_data("karate", description="Zachary's karate club (networkx): 34 members, classify the faction each "
               "joined after the split (2 classes) from a few labelled nodes")
class KarateClubDataModule(NodeGraphDataModule):
    """34 nodes, 78 friendships; label = the `club` attribute (0 = Mr. Hi, 1 = Officer; 17 each).
    Features: `identity` (one-hot node id, F = 34: the model can only tell nodes apart by their
    position in the graph) or `degree` (one-hot degree, F = 18)."""

    MAX_DEGREE = 17

    def __init__(
        self,
        batch_size: BatchSize = 64,
        num_workers: Workers = 0,
        fanout: Fanout = None,
        steps_per_epoch: StepsPerEpoch = 1,
        features: Literal["identity", "degree"] = "identity",
        labels_per_class: Annotated[int, Range(ge=1, le=16)] = 2,
        val_fraction: ValFraction = 0.5,  # of the unlabelled nodes; the rest is test
        split_seed: Seed = 0,
    ):
        super().__init__(batch_size, num_workers, fanout, steps_per_epoch)
        self.features, self.labels_per_class, self.val_fraction, self.split_seed = (
            features, labels_per_class, val_fraction, split_seed)

    def info(self) -> dict[str, Any]:
        return {"in_features": 34 if self.features == "identity" else self.MAX_DEGREE + 1, "num_classes": 2}

    def build_graph(self):
        import networkx as nx

        g = nx.karate_club_graph()
        n = g.number_of_nodes()
        y = torch.tensor([0 if g.nodes[i]["club"] == "Mr. Hi" else 1 for i in range(n)])
        edge_index = undirected_edge_index(torch.tensor(list(g.edges())))
        if self.features == "identity":
            x = torch.eye(n)
        else:
            deg = torch.tensor([g.degree(i) for i in range(n)]).clamp_max(self.MAX_DEGREE)
            x = torch.nn.functional.one_hot(deg, self.MAX_DEGREE + 1).float()
        return _data(x, y, edge_index, split_masks(y, self.labels_per_class, self.val_fraction, self.split_seed))


# ------------------------------------------------------------------------------------ SBM
@register_data("sbm", description="stochastic block model graphs (seeded): classify each node's block from "
               "noisy block-indicator features and the edges (p_in within, p_out between blocks)")
class SBMDataModule(NodeGraphDataModule):
    """`num_blocks` blocks of `block_size` nodes; each pair i < j is an edge with probability p_in
    (same block) or p_out (different blocks). Features x_i = onehot(block_i) + feature_noise * N(0, I)
    (F = num_blocks): alone they classify poorly when the noise is large; averaging over neighbours,
    mostly of the same block when p_in >> p_out, denoises them. Graph and split by `graph_seed`."""

    MAX_NODES = 20_000  # the pair sampling holds an N x N matrix

    def __init__(
        self,
        batch_size: BatchSize = 64,
        num_workers: Workers = 0,
        fanout: Fanout = None,
        steps_per_epoch: StepsPerEpoch = 1,
        num_blocks: Annotated[int, Range(ge=2, le=100)] = 3,
        block_size: Annotated[int, Range(ge=2, le=20_000)] = 60,
        p_in: Annotated[float, Range(ge=0.0, le=1.0)] = 0.15,
        p_out: Annotated[float, Range(ge=0.0, le=1.0)] = 0.02,
        feature_noise: Annotated[float, Range(ge=0.0, le=1000.0)] = 1.0,
        labels_per_class: LabelsPerClass = 5,
        val_fraction: ValFraction = 0.5,
        graph_seed: Seed = 0,
    ):
        super().__init__(batch_size, num_workers, fanout, steps_per_epoch)
        if num_blocks * block_size > self.MAX_NODES:
            raise ConfigError("data.block_size", f"num_blocks * block_size = {num_blocks * block_size} nodes; "
                              f"at most {self.MAX_NODES}")
        self.num_blocks, self.block_size, self.p_in, self.p_out = num_blocks, block_size, p_in, p_out
        self.feature_noise, self.labels_per_class, self.val_fraction = feature_noise, labels_per_class, val_fraction
        self.graph_seed = graph_seed

    def info(self) -> dict[str, Any]:
        return {"in_features": self.num_blocks, "num_classes": self.num_blocks}

    def build_graph(self):
        gen = torch.Generator().manual_seed(self.graph_seed)
        n = self.num_blocks * self.block_size
        y = torch.arange(n) // self.block_size  # block of each node
        same = y[:, None] == y[None, :]
        prob = torch.where(same, self.p_in, self.p_out)  # (N, N)
        adj = (torch.rand(n, n, generator=gen) < prob).triu(1)  # each pair i < j once
        edge_index = undirected_edge_index(torch.nonzero(adj))
        x = torch.nn.functional.one_hot(y, self.num_blocks).float()
        x = x + self.feature_noise * torch.randn(n, self.num_blocks, generator=gen)
        masks = split_masks(y, self.labels_per_class, self.val_fraction, self.graph_seed)
        return _data(x, y, edge_index, masks)


# ------------------------------------------------------------------------------------ Planetoid
PLANETOID = {"Cora": (1433, 7), "CiteSeer": (3703, 6), "PubMed": (500, 3)}  # (features, classes)


@register_data("planetoid", description="Planetoid citation graphs Cora / CiteSeer / PubMed via PyG "
               "(downloaded on first use), public split of 20 labels per class")
class PlanetoidDataModule(NodeGraphDataModule):
    """Yang et al. 2016's split (as in Kipf & Welling): 20 training nodes per class, 500 validation,
    1000 test. Cora: 2708 nodes, 10556 directed edges, 1433 bag-of-words features, 7 classes.
    Downloaded by PyG into `root`/<dataset> on first use (needs the internet once)."""

    def __init__(
        self,
        batch_size: BatchSize = 64,
        num_workers: Workers = 0,
        fanout: Fanout = None,
        steps_per_epoch: StepsPerEpoch = 1,
        dataset: Literal["Cora", "CiteSeer", "PubMed"] = "Cora",
        root: str = "~/.cache/litlab/planetoid",
        normalize_features: bool = True,  # rows of x sum to 1 (PyG's NormalizeFeatures), as in the paper
        download: bool = True,  # False: only use files already in root
    ):
        super().__init__(batch_size, num_workers, fanout, steps_per_epoch)
        self.dataset, self.root = dataset, Path(os.path.expanduser(root))
        self.normalize_features, self.download = normalize_features, download

    def info(self) -> dict[str, Any]:
        features, classes = PLANETOID[self.dataset]
        return {"in_features": features, "num_classes": classes}

    def _present(self) -> bool:
        folder = self.root / self.dataset
        raw = [folder / "raw" / f"ind.{self.dataset.lower()}.{n}" for n in ("x", "tx", "allx", "y", "ty", "ally",
                                                                          "graph", "test.index")]
        return (folder / "processed" / "data.pt").exists() or all(p.exists() for p in raw)

    def load(self):
        """The Planetoid dataset (downloads when missing and download=True); a one-line UserError
        when it is not there and cannot be fetched."""
        from torch_geometric.datasets import Planetoid
        from torch_geometric.transforms import NormalizeFeatures

        if not self._present() and not self.download:
            raise UserError(f"data.dataset: {self.dataset} is not in {self.root} and data.download=false")
        try:
            return Planetoid(str(self.root), self.dataset, transform=NormalizeFeatures() if self.normalize_features
                             else None)
        except Exception as e:  # no network: URLError, socket errors, ... deep in PyG's download
            if self._present():
                raise
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"data.dataset: cannot download {self.dataset} (offline? {reason}); run once with "
                            f"internet access, or put the raw Planetoid files in {self.root / self.dataset / 'raw'}") from None

    def prepare_data(self) -> None:
        self.load()  # rank 0 downloads once

    def build_graph(self):
        return self.load()[0]
