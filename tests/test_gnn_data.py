"""Chapter 10's data modules: karate club, the stochastic block model, synthetic graphs for graph
classification, Planetoid from local files (and one clear line offline)."""

from __future__ import annotations


import pytest
import torch

from litlab.chapters.gnn.module import GCNNodeClassifier
from litlab.data.graph_classification import SyntheticGraphsDataModule
from litlab.data.graphs import KarateClubDataModule, PlanetoidDataModule, SBMDataModule
from litlab.errors import UserError

torch.set_num_threads(1)


def test_karate_club_data():
    for features, width in (("identity", 34), ("degree", 18)):
        dm = KarateClubDataModule(features=features, labels_per_class=3)
        assert dm.info() == {"in_features": width, "num_classes": 2}
        dm.setup()
        g = dm.graph
        assert g.x.shape == (34, width) and g.edge_index.shape == (2, 156)
        assert torch.bincount(g.y).tolist() == [17, 17] and g.y[0] == 0 and g.y[33] == 1  # Mr. Hi, Officer
        masks = torch.stack([g.train_mask, g.val_mask, g.test_mask]).long()
        assert torch.equal(masks.sum(0), torch.ones(34, dtype=torch.long))  # a partition
        assert torch.bincount(g.y[g.train_mask]).tolist() == [3, 3]
        batch = next(iter(dm.train_dataloader()))
        assert batch is g  # full graph: one batch = the whole graph


def test_sbm_is_seeded_and_has_the_block_structure():
    a, b = SBMDataModule(block_size=100, graph_seed=3), SBMDataModule(block_size=100, graph_seed=3)
    a.setup(), b.setup()
    assert torch.equal(a.graph.edge_index, b.graph.edge_index) and torch.equal(a.graph.x, b.graph.x)
    g = a.graph
    src, dst = g.edge_index
    same = g.y[src] == g.y[dst]
    pairs_in, pairs_out = 3 * 100 * 99 / 2, 3 * 100 * 200 / 2
    assert abs(same.sum() / 2 / pairs_in - 0.15) < 0.02 and abs((~same).sum() / 2 / pairs_out - 0.02) < 0.005
    assert (g.x.argmax(-1) == g.y).float().mean() < 0.85  # the features alone are noisy


def test_synthetic_graphs():
    dm = SyntheticGraphsDataModule(num_graphs=40, features="degree")
    dm.setup()
    assert len(dm.train_set) == 24 and len(dm.val_set) == 8 and len(dm.test_set) == 8
    for g in dm.train_set:
        n, e = g.num_nodes, g.edge_index.size(1) // 2
        deg = torch.bincount(g.edge_index[1], minlength=n)
        assert (e, (deg == 2).all().item()) == ((n, True) if g.y.item() == 0 else (n - 1, False))
        assert torch.equal(g.x.argmax(-1), deg)
    comm = SyntheticGraphsDataModule(task="communities", num_graphs=200, min_nodes=30, max_nodes=30)
    comm.setup()
    mean_degree = [torch.tensor([g.edge_index.size(1) / g.num_nodes for g in comm.train_set if g.y.item() == c]).mean()
                   for c in (0, 1)]
    assert abs(mean_degree[0] - mean_degree[1]) < 0.5  # the degree does not give the class away


def test_planetoid_offline_is_one_clear_line(tmp_path, monkeypatch):
    from torch_geometric.datasets import Planetoid

    dm = PlanetoidDataModule(root=str(tmp_path))
    assert dm.info() == {"in_features": 1433, "num_classes": 7}  # without the files
    with pytest.raises(UserError, match="download=false"):
        PlanetoidDataModule(root=str(tmp_path), download=False).prepare_data()

    def offline(self):
        raise OSError("Cannot connect to host github.com:443 [Name or service not known]")

    monkeypatch.setattr(Planetoid, "download", offline)  # never touch the network in tests
    with pytest.raises(UserError) as err:
        dm.prepare_data()
    assert "cannot download Cora" in str(err.value) and "\n" not in str(err.value)


def write_fake_planetoid(raw, n_train_all: int = 540, n_test: int = 30, features: int = 1433, classes: int = 7):
    """Raw files in Planetoid's format (pickled scipy/numpy + test.index) for a small made-up Cora:
    a ring of n_train_all + n_test nodes, the first 20 labelled (PyG: train = y's rows, val = next 500)."""
    import pickle

    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    n = n_train_all + n_test
    labels = np.eye(classes)[rng.integers(0, classes, n)]
    feats = sp.random(n, features, density=0.01, format="csr", random_state=0, dtype=np.float32)
    items = {"x": feats[:20], "allx": feats[:n_train_all], "tx": feats[n_train_all:], "y": labels[:20],
             "ally": labels[:n_train_all], "ty": labels[n_train_all:],
             "graph": {i: [(i - 1) % n, (i + 1) % n] for i in range(n)}}
    raw.mkdir(parents=True)
    for name, obj in items.items():
        (raw / f"ind.cora.{name}").write_bytes(pickle.dumps(obj))
    (raw / "ind.cora.test.index").write_text("\n".join(str(i) for i in range(n_train_all, n)) + "\n")


def test_planetoid_reads_local_files_without_network(tmp_path):
    write_fake_planetoid(tmp_path / "Cora" / "raw")
    dm = PlanetoidDataModule(root=str(tmp_path), download=False)
    dm.prepare_data()
    dm.setup("fit")
    g = dm.graph
    assert g.x.shape == (570, 1433) and int(g.train_mask.sum()) == 20 and int(g.val_mask.sum()) == 500
    assert torch.allclose(g.x.sum(1)[g.x.sum(1) > 0], torch.tensor(1.0))  # rows normalised
    model = GCNNodeClassifier(**dm.info())
    model.training_step(next(iter(dm.train_dataloader())), 0).backward()
