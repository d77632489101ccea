"""GraphSAGE's LSTM aggregator without a host sync: the neighbourhoods laid out in a (T, D, F) grid
whose shape the data made on the host (graph_sampling.neighbourhood_shape) give the states packing
gives (tests/test_gnn.py checks the packed path against PyG and the reading order)."""

from __future__ import annotations

import torch

from litlab.chapters.gnn.layers import SAGELayer
from litlab.data.graph_sampling import NeighborSampler, neighbourhood_shape
from litlab.data.graphs import SBMDataModule


def test_neighbourhood_shape_by_hand():
    edges = torch.tensor([[5, 6, 7, 1, 0], [0, 0, 2, 2, 2]])  # node 2: 3 in-edges, node 0: 2, node 1: none
    assert neighbourhood_shape(edges) == (3, 3)
    assert neighbourhood_shape(torch.empty(2, 0, dtype=torch.long)) == (0, 0)


def test_the_padded_grid_gives_the_packed_states_and_gradients():
    torch.manual_seed(0)
    n = 30  # targets among nodes 0..19 only, some of them without neighbours; repeated edges too
    edges = torch.stack([torch.randint(0, n, (80,)), torch.randint(0, 20, (80,))])
    h = torch.randn(n, 5, requires_grad=True)
    layer = SAGELayer(5, 3, "lstm")
    src, dst = edges
    packed = layer._lstm_aggregate(h, src, dst)
    padded = layer._lstm_aggregate_padded(h, src, dst, *neighbourhood_shape(edges))
    torch.testing.assert_close(padded, packed)
    assert torch.equal(padded[20:], torch.zeros(10, 5))
    params = [h, *layer.lstm.parameters()]
    grads = [torch.autograd.grad(out.square().sum(), params) for out in (packed, padded)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # and a bound larger than the graph's (a sampler's fan-out) changes nothing
    torch.testing.assert_close(layer._lstm_aggregate_padded(h, src, dst, 25, 12), packed)


def test_the_data_tells_the_shape_of_every_batch():
    dm = SBMDataModule(num_blocks=2, block_size=30, p_in=0.3, p_out=0.05)
    dm.setup()
    assert dm.graph.neighbourhoods == neighbourhood_shape(dm.graph.edge_index)
    sampler = NeighborSampler(dm.graph, [4, 2])
    torch.manual_seed(1)
    batch = sampler(torch.randperm(dm.graph.num_nodes)[:8])
    t, d = batch.neighbourhoods
    assert (t, d) == neighbourhood_shape(batch.edge_index) and d <= 4 and t < batch.num_nodes


def test_graph_classification_batches_carry_their_shape_and_the_lstm_uses_it(monkeypatch):
    """Batches of graphs (PyG's collate) get their neighbourhood_shape where they are made; the
    graph classifier with the LSTM aggregator gives the same logits and gradients with it (the
    padded grid) as without it (packing)."""
    padded_calls = []
    padded = SAGELayer._lstm_aggregate_padded
    monkeypatch.setattr(SAGELayer, "_lstm_aggregate_padded",
                        lambda self, *a: padded_calls.append(1) or padded(self, *a))
    from litlab.chapters.gnn.graph_classification import GraphClassifier
    from litlab.data.graph_classification import SyntheticGraphsDataModule

    dm = SyntheticGraphsDataModule(num_graphs=24, batch_size=6, max_nodes=12)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch.neighbourhoods == neighbourhood_shape(batch.edge_index) and batch.num_graphs == 6
    torch.manual_seed(0)
    model = GraphClassifier(**dm.info(), conv="sage", aggregator="lstm", hidden=8, num_layers=2)
    with_shape = model(batch)
    grads = torch.autograd.grad(with_shape.square().sum(), list(model.parameters()))
    assert len(padded_calls) == 2  # both layers laid the neighbourhoods out in the grid
    del batch.neighbourhoods
    without = model(batch)
    torch.testing.assert_close(with_shape, without)
    assert len(padded_calls) == 2  # packed
    for a, b in zip(grads, torch.autograd.grad(without.square().sum(), list(model.parameters()))):
        torch.testing.assert_close(a, b)
