"""Chapter 10, graph neural networks: the layers against hand-computed values and PyG's reference
layers (same weights), the neighbour sampler's fan-out and seeded learning checks (the data modules: test_gnn_data.py)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from litlab.chapters.gnn.graph_classification import GraphClassifier
from litlab.chapters.gnn.layers import (
    GATLayer,
    GCNLayer,
    SAGELayer,
    normalized_adjacency,
    segment_softmax,
)
from litlab.chapters.gnn.module import (
    GATNodeClassifier,
    GCNNodeClassifier,
    GraphSAGENodeClassifier,
)
from litlab.chapters.gnn.nets import NodeClassifierNet, mean_average_distance, readout
from litlab.chapters.gnn.oversmoothing import GNNDepthSweep
from litlab.config import OptimConfig
from litlab.data.graph_classification import SyntheticGraphsDataModule
from litlab.data.graph_sampling import NeighborSampler
from litlab.data.graphs import (
    KarateClubDataModule,
    SBMDataModule,
    undirected_edge_index,
)

torch.set_num_threads(1)


def random_graph(n: int = 12, p: float = 0.3, seed: int = 0) -> torch.Tensor:
    """An undirected Erdos-Renyi graph as edge_index (both directions), no self-loops."""
    g = torch.Generator().manual_seed(seed)
    return undirected_edge_index(torch.nonzero((torch.rand(n, n, generator=g) < p).triu(1)))


# ------------------------------------------------------------------------------------ GCN
def test_normalized_adjacency_equals_hand_computed():
    # path 0 - 1 - 2 plus an isolated node 3; degrees with self-loops: 2, 3, 2, 1
    ei = undirected_edge_index(torch.tensor([[0, 1], [1, 2]]))
    s6, s4 = 1 / math.sqrt(6), 1 / 2
    expected = torch.tensor([[s4, s6, 0, 0],
                             [s6, 1 / 3, s6, 0],
                             [0, s6, s4, 0],
                             [0, 0, 0, 1.0]])
    assert torch.allclose(normalized_adjacency(ei, 4), expected, atol=1e-7)
    layer = GCNLayer(3, 2)
    h = torch.randn(4, 3)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.0]))
        assert torch.allclose(layer(h, ei), expected @ h @ layer.linear.weight.t() + layer.bias, atol=1e-6)


def test_gcn_layer_matches_pyg_gcnconv():
    from torch_geometric.nn import GCNConv

    ei, x = random_graph(15), torch.randn(15, 6)
    ours, ref = GCNLayer(6, 4), GCNConv(6, 4)
    with torch.no_grad():
        ref.lin.weight.copy_(ours.linear.weight)
        ours.bias.copy_(torch.randn(4))
        ref.bias.copy_(ours.bias)
    assert torch.allclose(ours(x, ei), ref(x, ei), atol=1e-5)


# ------------------------------------------------------------------------------------ GraphSAGE
def copy_sage(ours: SAGELayer, ref) -> None:
    """W [h_i || h_N] = lin_r h_i + lin_l h_N: our weight is [lin_r | lin_l], our bias lin_l's."""
    with torch.no_grad():
        ref.lin_l.bias.normal_()
        ours.linear.weight.copy_(torch.cat([ref.lin_r.weight, ref.lin_l.weight], dim=1))
        ours.linear.bias.copy_(ref.lin_l.bias)


@pytest.mark.parametrize("aggregator,normalize", [("mean", False), ("mean", True), ("max", False), ("pool", False)])
def test_sage_layer_matches_pyg_sageconv(aggregator, normalize):
    from torch_geometric.nn import SAGEConv

    ei, x = random_graph(15), torch.randn(15, 5)
    ours = SAGELayer(5, 3, aggregator, normalize=normalize)
    # the paper's pooling aggregator = PyG's max with project=True (ReLU(lin(x_j)) then max)
    ref = SAGEConv(5, 3, aggr="max" if aggregator == "pool" else aggregator, normalize=normalize,
                   project=aggregator == "pool")
    copy_sage(ours, ref)
    if aggregator == "pool":
        ours.pool.load_state_dict(ref.lin.state_dict())
    assert torch.allclose(ours(x, ei), ref(x, ei), atol=1e-5)


def test_sage_lstm_aggregator_matches_pyg_on_a_regular_graph():
    # PyG's LSTM aggregation reads each neighbourhood in edge order and takes the output after the
    # LAST padded slot; on a regular graph (no padding) with edges sorted like ours they agree.
    from torch_geometric.nn import SAGEConv

    n = 7
    ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n], dim=1)
    ei = undirected_edge_index(ring)
    ei = ei[:, torch.argsort(ei[1] * n + ei[0])]  # by target, then source (PyG needs sorted targets)
    x = torch.randn(n, 4)
    ours, ref = SAGELayer(4, 3, "lstm"), SAGEConv(4, 3, aggr="lstm")
    copy_sage(ours, ref)
    ours.lstm.load_state_dict(ref.aggr_module.lstm.state_dict())
    assert torch.allclose(ours(x, ei), ref(x, ei), atol=1e-5)


def test_lstm_aggregator_reads_neighbours_in_ascending_id_order():
    ei, x = random_graph(10, 0.5, seed=3), torch.randn(10, 4)
    layer = SAGELayer(4, 2, "lstm")
    agg = layer.aggregate(x, ei)
    # the documented order: node i's neighbours sorted by id, fed to the LSTM, last hidden state
    for i in range(10):
        neighbours = torch.sort(ei[0, ei[1] == i]).values
        if neighbours.numel():
            _, (h, _) = layer.lstm(x[neighbours][None])
            assert torch.allclose(agg[i], h[0, 0], atol=1e-6)
        else:
            assert torch.equal(agg[i], torch.zeros(4))
    # invariant to the order of the edge list ...
    shuffled = ei[:, torch.randperm(ei.size(1), generator=torch.Generator().manual_seed(1))]
    assert torch.allclose(layer(x, shuffled), layer(x, ei), atol=1e-6)
    # ... but not equivariant to relabelling the nodes (the reading order changes), unlike mean
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(2))
    inverse = torch.argsort(perm)  # new id of old node v is inverse[v]; x_new[inverse[v]] = x[v]
    ei_new, x_new = inverse[ei], x[perm]
    mean = SAGELayer(4, 2, "mean")
    assert torch.allclose(mean(x_new, ei_new), mean(x, ei)[perm], atol=1e-6)
    assert not torch.allclose(layer(x_new, ei_new), layer(x, ei)[perm], atol=1e-4)


# ------------------------------------------------------------------------------------ GAT
@pytest.mark.parametrize("concat", [True, False])
def test_gat_layer_matches_pyg_gatconv(concat):
    from torch_geometric.nn import GATConv

    ei, x = random_graph(14, seed=1), torch.randn(14, 5)
    ours, ref = GATLayer(5, 4, heads=3, concat=concat), GATConv(5, 4, heads=3, concat=concat)
    with torch.no_grad():
        ref.lin.weight.copy_(ours.linear.weight)
        ref.att_src.copy_(ours.att_src)
        ref.att_dst.copy_(ours.att_dst)
        ours.bias.normal_()
        ref.bias.copy_(ours.bias)
    out, (ei_loops, alpha) = ours(x, ei, return_attention=True)
    ref_out, (ref_ei, ref_alpha) = ref(x, ei, return_attention_weights=True)
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.equal(ei_loops, ref_ei) and torch.allclose(alpha, ref_alpha, atol=1e-5)


def test_gat_attention_sums_to_one_over_each_neighbourhood():
    n = 13  # node 12 is isolated: its only "neighbour" is itself, weight 1
    ei = random_graph(12, seed=4)
    _, (ei_loops, alpha) = GATLayer(3, 2, heads=4)(torch.randn(n, 3), ei, return_attention=True)
    sums = torch.zeros(n, 4).index_add_(0, ei_loops[1], alpha)
    assert torch.allclose(sums, torch.ones(n, 4), atol=1e-6)
    assert (alpha > 0).all()
    assert torch.allclose(alpha[(ei_loops[0] == 12) & (ei_loops[1] == 12)], torch.ones(1, 4))
    # the segment softmax is torch.softmax within each neighbourhood
    scores, index = torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 1, 2])
    got = segment_softmax(scores, index, 3)
    assert torch.allclose(got[2:5], torch.softmax(scores[2:5], dim=0))


# ------------------------------------------------------------------------------------ sampling
def test_neighbour_sampling_respects_the_fanout():
    dm = SBMDataModule(num_blocks=2, block_size=40, p_in=0.3, p_out=0.05)
    dm.setup()
    g = dm.graph
    degree = torch.bincount(g.edge_index[1], minlength=g.num_nodes)
    edges = set(map(tuple, g.edge_index.t().tolist()))
    sampler = NeighborSampler(g, [4, 2])
    torch.manual_seed(0)
    seeds = torch.randperm(g.num_nodes)[:10]
    for _ in range(5):
        b = sampler(seeds)
        assert torch.equal(b.n_id[:b.batch_size], seeds) and b.n_id.unique().numel() == b.n_id.numel()
        indeg = torch.bincount(b.edge_index[1], minlength=b.num_nodes)
        # seeds: exactly min(deg, 4) sampled in-neighbours; hop-1 nodes: min(deg, 2); hop-2 nodes: none
        assert torch.equal(indeg[:10], degree[seeds].clamp_max(4))
        hop1 = indeg[10:] > 0
        assert torch.equal(indeg[10:][hop1], degree[b.n_id[10:][hop1]].clamp_max(2))
        sampled = b.edge_index.t().tolist()
        assert len(set(map(tuple, sampled))) == len(sampled)  # without replacement
        assert all((int(b.n_id[s]), int(b.n_id[t])) in edges for s, t in sampled)  # real edges
        assert torch.equal(b.x, g.x[b.n_id]) and b.train_mask.sum() == 10
    full = NeighborSampler(g, [-1])(seeds)  # -1: every neighbour
    assert torch.equal(torch.bincount(full.edge_index[1], minlength=full.num_nodes)[:10], degree[seeds])


# ------------------------------------------------------------------------------------ nets
def test_mad_closed_form_equals_pairwise_cosine_distance():
    h = torch.randn(9, 5)
    h[4] = 0  # cosine undefined: left out
    u = h[[i for i in range(9) if i != 4]]
    cos = F.cosine_similarity(u[:, None], u[None, :], dim=-1)
    brute = (1 - cos)[~torch.eye(8, dtype=torch.bool)].mean()
    assert torch.allclose(mean_average_distance(h), brute, atol=1e-6)
    assert mean_average_distance(torch.ones(5, 3) * torch.arange(1, 6)[:, None]) < 1e-6  # all parallel


def test_readout_pools_each_graph_and_is_permutation_invariant():
    h, batch = torch.randn(7, 3), torch.tensor([0, 0, 0, 1, 1, 2, 2])
    for mode, fn in (("mean", lambda t: t.mean(0)), ("sum", lambda t: t.sum(0)), ("max", lambda t: t.max(0).values)):
        expected = torch.stack([fn(h[batch == g]) for g in range(3)])
        assert torch.allclose(readout(h, batch, 3, mode), expected, atol=1e-6)
    dm = SyntheticGraphsDataModule(num_graphs=10, batch_size=10)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    model = GraphClassifier(**dm.info()).eval()
    perm = torch.randperm(b.num_nodes)  # relabel all nodes; the graphs stay the same
    inverse = torch.argsort(perm)
    out = model.net(b.x, b.edge_index, b.batch, b.num_graphs)
    out_perm = model.net(b.x[perm], inverse[b.edge_index], b.batch[perm], b.num_graphs)
    assert torch.allclose(out, out_perm, atol=1e-5)


def test_deep_gcn_oversmooths_at_initialisation():
    dm = SBMDataModule()
    dm.setup()
    torch.manual_seed(0)
    net = NodeClassifierNet("gcn", 3, 3, hidden=16, num_layers=16).eval()
    _, outputs = net(dm.graph.x, dm.graph.edge_index, return_hidden=True)
    mads = [float(mean_average_distance(h)) for h in outputs]
    assert mads[0] > 0.2 and mads[4] < 0.1 * mads[0] and max(mads[10:]) < 0.01 * mads[0]


# ------------------------------------------------------------------------------------ learning
def fit(model, dm, epochs: int, lr: float = 0.01, weight_decay: float = 5e-4) -> dict[str, float]:
    model.optim_config = OptimConfig(lr=lr, weight_decay=weight_decay)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return trainer.test(model, datamodule=dm, verbose=False)[0]


def test_gcn_separates_the_karate_factions_from_four_labels():
    L.seed_everything(0, verbose=False)
    dm = KarateClubDataModule(labels_per_class=2, steps_per_epoch=20)
    metrics = fit(GCNNodeClassifier(**dm.info()), dm, epochs=5)
    assert metrics["test/acc"] >= 0.9  # 15 test members; chance 0.5


def test_gat_and_graphsage_learn_sbm_blocks():
    results = {}
    for name, cls, kwargs, data in (
        ("gat", GATNodeClassifier, {"heads": 4}, {}),
        ("sage_sampled", GraphSAGENodeClassifier, {}, {"fanout": [5, 5], "batch_size": 16, "labels_per_class": 20}),
        ("sage_lstm", GraphSAGENodeClassifier, {"aggregator": "lstm"}, {"labels_per_class": 20}),
    ):
        L.seed_everything(0, verbose=False)
        dm = SBMDataModule(steps_per_epoch=10, **data)
        epochs = 15 if "fanout" in data else 6
        results[name] = fit(cls(**dm.info(), **kwargs), dm, epochs=epochs)["test/acc"]
    # 3 balanced blocks: chance 1/3; the noisy features alone (argmax) get ~0.7
    assert all(acc > 0.75 for acc in results.values()), results


def test_graph_classifier_tells_cycles_from_trees():
    L.seed_everything(0, verbose=False)
    dm = SyntheticGraphsDataModule(num_graphs=200, batch_size=32)
    metrics = fit(GraphClassifier(**dm.info(), hidden=16), dm, epochs=6, weight_decay=0.0)
    assert metrics["test/acc"] >= 0.9  # chance 0.5


def test_depth_sweep_deep_gcn_oversmooths_and_loses_accuracy():
    L.seed_everything(0, verbose=False)
    dm = SBMDataModule(steps_per_epoch=20)
    model = GNNDepthSweep(**dm.info(), depths=(2, 16))
    metrics = fit(model, dm, epochs=5)
    assert metrics["test/acc_L2"] > 0.85 and metrics["test/acc_L16"] < metrics["test/acc_L2"] - 0.3
    assert metrics["test/mad_L16"] < 0.5 * metrics["test/mad_L2"]
    init = model.mad_by_layer_init  # the 16-layer net before training: MAD shrinks with every layer
    assert len(init) == 16 and init[-1] < 0.01 * init[0]


def test_experiments_log_metrics_and_plots_to_mlflow(tracking_uri):
    """gcn_karate.yaml as written (accuracy, metrics, embeddings plot) and a shrunk oversmoothing.yaml
    (its plot), through the real runner, into one store (creating a store costs seconds)."""
    from helpers import REPO
    from litlab import runner
    from litlab.tracking import client

    c = client(tracking_uri)
    result = runner.run(REPO / "experiments" / "gnn" / "gcn_karate.yaml", ["tracking.system_metrics=false"],
                        tracking_uri=tracking_uri)
    assert result.status == "FINISHED" and result.metrics["test/acc"] >= 0.9
    logged = set(c.get_run(result.run_id).data.metrics)
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc", "test/mad"} <= logged
    assert "plots/embeddings.png" in {a.path for a in c.list_artifacts(result.run_id, "plots")}

    shrink = ["model.depths=[1,4]", "trainer.max_epochs=2", "data.steps_per_epoch=2", "tracking.system_metrics=false"]
    result = runner.run(REPO / "experiments" / "gnn" / "oversmoothing.yaml", shrink, tracking_uri=tracking_uri)
    assert result.status == "FINISHED"
    assert {"test/acc_L1", "test/acc_L4", "test/mad_L1", "test/mad_L4"} <= set(result.metrics)
    assert "plots/oversmoothing.png" in {a.path for a in c.list_artifacts(result.run_id, "plots")}


def test_existing_self_loops_are_replaced_with_a_fixed_edge_count():
    """A graph that already has self-loops: GCN and GAT give them zero weight instead of dropping
    them (dropping would size the edge list from the values, a host sync per step on a GPU), and
    still agree with PyG and with A + I computed by hand."""
    from torch_geometric.nn import GATConv, GCNConv

    from litlab.chapters.gnn.layers import add_self_loops, with_self_loops

    edges = torch.tensor([[0, 1, 2, 2], [1, 0, 2, 0]])  # 2 -> 2 is a self-loop already
    ei, real = with_self_loops(edges, 3)
    assert ei.tolist() == [[0, 1, 2, 2, 0, 1, 2], [1, 0, 2, 0, 0, 1, 2]]
    assert real.tolist() == [True, True, False, True, True, True, True]
    assert add_self_loops(edges, 3).tolist() == [[0, 1, 2, 0, 1, 2], [1, 0, 0, 0, 1, 2]]
    a_plus_i = torch.zeros(3, 3).index_put_((edges[1], edges[0]), torch.ones(4)).fill_diagonal_(1)
    d = a_plus_i.sum(1).rsqrt()
    assert torch.allclose(normalized_adjacency(edges, 3), d[:, None] * a_plus_i * d[None, :], atol=1e-7)

    looped = torch.cat([random_graph(15, seed=5), torch.tensor([[3, 7, 7], [3, 7, 7]])], dim=1)
    x = torch.randn(15, 6)
    gcn, ref_gcn = GCNLayer(6, 4), GCNConv(6, 4)
    gat, ref_gat = GATLayer(6, 4, heads=2), GATConv(6, 4, heads=2)
    with torch.no_grad():
        ref_gcn.lin.weight.copy_(gcn.linear.weight)
        ref_gat.lin.weight.copy_(gat.linear.weight)
        ref_gat.att_src.copy_(gat.att_src)
        ref_gat.att_dst.copy_(gat.att_dst)
    assert torch.allclose(gcn(x, looped), ref_gcn(x, looped), atol=1e-5)
    out, (ei_loops, alpha) = gat(x, looped, return_attention=True)
    ref_out, (ref_ei, ref_alpha) = ref_gat(x, looped, return_attention_weights=True)
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.equal(ei_loops, ref_ei) and torch.allclose(alpha, ref_alpha, atol=1e-5)
    out.sum().backward()  # the masked scores (-inf) give finite gradients
    assert all(p.grad.isfinite().all() for p in gat.parameters())
