"""GraphSAGE neighbour sampling (Hamilton et al. 2017, Algorithm 2) for mini-batch node training.

For a mini-batch of seed nodes, hop k samples at most `fanout[k]` in-neighbours (without
replacement; -1 = all) of every node first reached at hop k-1, and adds those edges j -> i. The
batch is the union of the sampled edges over all hops, relabelled to local ids, seeds first, like
PyG's NeighborLoader (which needs pyg-lib or torch-sparse; this sampler uses torch ops only). An
L-layer GNN run on it computes the seeds' outputs from at most fanout[0] * ... * fanout[L-1]
sampled nodes instead of their whole L-hop neighbourhood. Use one fan-out per layer.

Each node is expanded once, at the hop where it is first reached, so every node of the batch has at
most max(fanout) sampled in-edges, and seed i exactly min(deg(i), fanout[0]).

Batch (a torch_geometric Data): x, y, edge_index (local ids), n_id (global ids), batch_size (the
seeds are local nodes 0..batch_size-1) and train_mask (True on the seeds: the loss uses only them).
Randomness comes from torch's global generator (seeded by the run's seed, and per worker).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def neighbourhood_shape(edge_index: Tensor) -> tuple[int, int]:
    """(T, D): every edge's target is one of the nodes 0..T-1, and none has more than D in-edges.
    Read on the host where the graph or batch is made (a data module, this sampler), it lets the LSTM
    aggregator lay out the neighbourhoods without reading the edges during the step."""
    dst = edge_index[1].cpu()
    if dst.numel() == 0:
        return 0, 0
    return int(dst.max()) + 1, int(torch.bincount(dst).max())


class NeighborSampler:
    """`sampler(seed_ids)` -> the sampled subgraph around `seed_ids`; usable as a DataLoader
    collate_fn over a dataset of node ids: DataLoader(train_ids, batch_size, shuffle=True, collate_fn=sampler)."""

    def __init__(self, graph, fanout: Sequence[int]):
        if not fanout or any(k == 0 or k < -1 for k in fanout):
            raise ValueError(f"fanout must be a non-empty list of positive ints (or -1 = all), got {list(fanout)}")
        self.graph, self.fanout = graph, list(fanout)
        n = graph.num_nodes
        src, dst = graph.edge_index
        order = torch.argsort(dst * n + src)  # CSR by target: the in-neighbours of i are contiguous
        self.neighbours = src[order]  # (E,)
        self.rowptr = torch.zeros(n + 1, dtype=torch.long)
        self.rowptr[1:] = torch.cumsum(torch.bincount(dst, minlength=n), 0)

    def sample_edges(self, frontier: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """At most k random in-neighbours of each frontier node: (sources, targets), global ids."""
        start, deg = self.rowptr[frontier], self.rowptr[frontier + 1] - self.rowptr[frontier]
        seg = torch.repeat_interleave(torch.arange(frontier.numel()), deg)  # candidate edge -> frontier slot
        offset = torch.arange(seg.numel()) - (torch.cumsum(deg, 0) - deg)[seg]
        candidates = self.neighbours[start[seg] + offset]  # (sum deg,)
        if k != -1:
            # k of deg without replacement: rank the candidates of each node by a random key, keep rank < k
            order = torch.argsort(seg.double() + torch.rand(seg.numel(), dtype=torch.double))
            rank = torch.empty_like(order)
            rank[order] = offset  # sorting keeps segments in place: slot `offset` of a segment gets rank offset
            keep = rank < k
            seg, candidates = seg[keep], candidates[keep]
        return candidates, frontier[seg]

    def __call__(self, seed_ids: Sequence[int] | Tensor):
        from torch_geometric.data import Data

        g = self.graph
        seeds = torch.as_tensor(seed_ids, dtype=torch.long)  # (B,), distinct node ids
        local = torch.full((g.num_nodes,), -1, dtype=torch.long)  # global -> local id
        local[seeds] = torch.arange(seeds.numel())
        n_id, frontier, sources, targets = [seeds], seeds, [], []
        for k in self.fanout:
            if frontier.numel() == 0:
                break
            src, dst = self.sample_edges(frontier, k)
            sources.append(src)
            targets.append(dst)
            new = src[local[src] < 0].unique()  # reached for the first time: expanded at the next hop
            local[new] = sum(t.numel() for t in n_id) + torch.arange(new.numel())
            n_id.append(new)
            frontier = new
        n_id = torch.cat(n_id)
        edge_index = torch.stack([local[torch.cat(sources)], local[torch.cat(targets)]])
        train_mask = torch.arange(n_id.numel()) < seeds.numel()
        return Data(x=g.x[n_id], y=g.y[n_id], edge_index=edge_index, n_id=n_id, batch_size=seeds.numel(),
                    train_mask=train_mask, num_nodes=n_id.numel(), neighbourhoods=neighbourhood_shape(edge_index))
