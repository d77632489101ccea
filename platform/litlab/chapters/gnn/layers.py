"""Chapter 10 message-passing layers, written from the course equations with torch index ops.

Graph convention (PyG's): `edge_index` (2, E) holds directed edges j -> i as columns
(edge_index[0] = source j, edge_index[1] = target i); an undirected graph stores both directions.
Node i aggregates over its in-neighbours N(i) = {j : (j -> i) in E}. Messages of E edges are summed
into N nodes with `index_add_` / `scatter_reduce` on the target index.

- GCN (Kipf & Welling 2017):   H' = Â H W,  Â = D^-1/2 (A + I) D^-1/2,  D_ii = sum_j (A + I)_ij
- GraphSAGE (Hamilton 2017):   h_i' = W [h_i || AGG({h_j : j in N(i)})]  (+ optional h_i' / ||h_i'||_2)
- GAT (Velickovic 2018):       e_ij = LeakyReLU(a^T [W h_i || W h_j]),  alpha_ij = softmax_{j in N(i) u {i}} e_ij,
                               h_i' = ||_k sum_j alpha_ij^k W^k h_j  (concat of K heads) or their mean

The nonlinearity sigma is applied by the network (nets.py), not by the layers.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Aggregator = Literal["mean", "max", "pool", "lstm"]


# ------------------------------------------------------------------------------ graph utilities
def with_self_loops(edge_index: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """Every edge plus i -> i for every node: (2, E + N), and `real` (E + N,) bool, False on the
    self-loops edge_index already had (the added ones replace them: layers give them zero weight).
    Dropping them instead would give a value-dependent edge count, which a GPU must report to the
    host before the next op can be sized (a sync each step); this size depends only on the shapes."""
    loops = torch.arange(num_nodes, device=edge_index.device).expand(2, num_nodes)
    real = torch.cat([edge_index[0] != edge_index[1], loops.new_ones(num_nodes, dtype=torch.bool)])
    return torch.cat([edge_index, loops], dim=1), real


def add_self_loops(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Drop existing self-loops, then add i -> i for every node: (2, E') with E' = E - loops + N
    (PyG's convention; the layers use `with_self_loops`, which keeps the size fixed)."""
    ei, real = with_self_loops(edge_index, num_nodes)
    return ei[:, real]


def gcn_norm(edge_index: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """The non-zeros of Â = D^-1/2 (A + I) D^-1/2 as (edge_index with self-loops (2, E + N), weights (E + N,)).

    d_i counts the in-edges of i including its self-loop; weight of j -> i is 1 / sqrt(d_i d_j),
    and 0 on the self-loops edge_index already had (see `with_self_loops`)."""
    ei, real = with_self_loops(edge_index, num_nodes)
    src, dst = ei
    counted = real.to(torch.get_default_dtype())  # (E + N,): 1 per edge of A + I
    deg = counted.new_zeros(num_nodes).index_add_(0, dst, counted)
    inv_sqrt = deg.pow(-0.5)  # every node has its self-loop: deg >= 1
    return ei, inv_sqrt[src] * inv_sqrt[dst] * counted


def normalized_adjacency(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Dense Â (N, N), Â[i, j] = weight of j -> i (symmetric for undirected graphs): for teaching/tests."""
    ei, w = gcn_norm(edge_index, num_nodes)
    a_hat = torch.zeros(num_nodes, num_nodes, device=edge_index.device)
    return a_hat.index_put_((ei[1], ei[0]), w, accumulate=True)


def scatter_sum(src: Tensor, index: Tensor, num_nodes: int) -> Tensor:
    """out[i] = sum of src[e] over edges e with index[e] = i: (E, *F) -> (N, *F)."""
    return src.new_zeros((num_nodes, *src.shape[1:])).index_add_(0, index, src)


def scatter_mean(src: Tensor, index: Tensor, num_nodes: int) -> Tensor:
    """Mean over each node's edges; a node without edges gets 0."""
    count = torch.zeros(num_nodes, device=src.device, dtype=src.dtype).index_add_(
        0, index, torch.ones_like(index, dtype=src.dtype))
    return scatter_sum(src, index, num_nodes) / count.clamp_min(1).view(-1, *([1] * (src.dim() - 1)))


def scatter_max(src: Tensor, index: Tensor, num_nodes: int) -> Tensor:
    """Element-wise max over each node's edges; a node without edges gets 0."""
    idx = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
    out = src.new_zeros((num_nodes, *src.shape[1:]))
    return out.scatter_reduce(0, idx, src, reduce="amax", include_self=False)


def segment_softmax(scores: Tensor, index: Tensor, num_nodes: int) -> Tensor:
    """Softmax of edge scores (E, H) over the edges sharing a target: sum of alpha over index == i is 1."""
    idx = index.view(-1, 1).expand_as(scores)
    peak = scores.new_full((num_nodes, scores.size(1)), float("-inf"))
    peak = peak.scatter_reduce(0, idx, scores, reduce="amax", include_self=True)  # (N, H), for stability
    exp = (scores - peak[index]).exp()  # (E, H)
    return exp / scatter_sum(exp, index, num_nodes)[index]


# ------------------------------------------------------------------------------ GCN
class GCNLayer(nn.Module):
    """H' = Â H W + b (Kipf & Welling), computed sparsely: h_i' = sum_{j in N(i) u {i}} h_j W / sqrt(d_i d_j).

    Same parameters as PyG's GCNConv: `linear.weight` = lin.weight (out, in), `bias`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        nn.init.xavier_uniform_(self.linear.weight)  # Glorot, as in the paper
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, h: Tensor, edge_index: Tensor, norm: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """h (N, F_in) -> (N, F_out); pass `norm = gcn_norm(edge_index, N)` to share it between layers."""
        ei, w = norm if norm is not None else gcn_norm(edge_index, h.size(0))
        hw = self.linear(h)  # (N, F_out): H W
        out = scatter_sum(w.unsqueeze(-1) * hw[ei[0]], ei[1], h.size(0))  # Â (H W)
        return out + self.bias if self.bias is not None else out


# ------------------------------------------------------------------------------ GraphSAGE
class SAGELayer(nn.Module):
    """h_i' = W [h_i || h_N(i)] + b, h_N(i) = AGG({h_j : j in N(i)}); optionally h_i' / ||h_i'||_2.

    Aggregators: `mean`; `max` (element-wise max of the h_j); `pool` (the paper's max-pooling:
    max_j sigma(W_pool h_j + b_pool)); `lstm` (an LSTM reads the neighbours and its last hidden state
    is h_N(i)). The LSTM needs an order: neighbours are read in a FIXED order, ascending node index.
    So the layer is invariant to the order of the columns of edge_index, but NOT equivariant to
    relabelling the nodes (a relabelling changes the reading order); mean/max/pool are both.
    A node without neighbours gets h_N(i) = 0.

    W [h_i || h_N] = W_self h_i + W_neigh h_N with W = [W_self | W_neigh]: PyG's SAGEConv has
    lin_r = W_self (no bias) and lin_l = W_neigh (+ b)."""

    def __init__(self, in_features: int, out_features: int, aggregator: Aggregator = "mean",
                 normalize: bool = False, bias: bool = True):
        super().__init__()
        self.aggregator, self.normalize = aggregator, normalize
        if aggregator == "lstm":
            self.lstm = nn.LSTM(in_features, in_features, batch_first=True)
        elif aggregator == "pool":
            self.pool = nn.Linear(in_features, in_features)
        elif aggregator not in ("mean", "max"):
            raise ValueError(f"unknown aggregator {aggregator!r}")
        self.linear = nn.Linear(2 * in_features, out_features, bias=bias)

    def aggregate(self, h: Tensor, edge_index: Tensor, neighbourhoods: tuple[int, int] | None = None) -> Tensor:
        """h_N(i) for every node: (N, F_in). `neighbourhoods` = data.graph_sampling.neighbourhood_shape(edge_index), for
        the LSTM: without it the neighbourhoods' sizes are read from the device (a host sync)."""
        src, dst = edge_index
        n = h.size(0)
        if self.aggregator == "mean":
            return scatter_mean(h[src], dst, n)
        if self.aggregator == "max":
            return scatter_max(h[src], dst, n)
        if self.aggregator == "pool":
            return scatter_max(torch.relu(self.pool(h))[src], dst, n)
        if neighbourhoods is not None and (not h.is_cpu or neighbourhoods[0] * neighbourhoods[1] <= 4 * src.numel()):
            # on a GPU always (reading the sizes is a sync); on a CPU, where reading is free, unless
            # the (T, D) grid is mostly padding (a full graph with a few high-degree hubs)
            return self._lstm_aggregate_padded(h, src, dst, *neighbourhoods)
        return self._lstm_aggregate(h, src, dst)

    def _lstm_aggregate_padded(self, h: Tensor, src: Tensor, dst: Tensor, t: int, d: int) -> Tensor:
        """The LSTM over every neighbourhood of nodes 0..T-1 laid out in (T, D, F), zero-padded at
        the end, and each node's output taken at its last real neighbour (position deg - 1): the
        state that packing gives, from shapes known on the host (no sync)."""
        n, f = h.shape
        if t == 0 or d == 0:
            return h.new_zeros(n, f)
        order = torch.argsort(dst * n + src)  # by target, then neighbour index: the fixed reading order
        src, dst = src[order], dst[order]
        deg = torch.zeros(t, dtype=torch.long, device=h.device).index_add_(0, dst, torch.ones_like(dst))  # (T,)
        pos = torch.arange(dst.numel(), device=h.device) - (torch.cumsum(deg, 0) - deg)[dst]
        seq = h.new_zeros(t, d, f)
        seq[dst, pos] = h[src]
        states, _ = self.lstm(seq)  # (T, D, F): the state after each position
        last = states[torch.arange(t, device=h.device), (deg - 1).clamp_min(0)]  # (T, F)
        out = torch.where((deg > 0).unsqueeze(1), last, torch.zeros_like(last)).to(h.dtype)
        return F.pad(out, (0, 0, 0, n - t))  # nodes T.. have no neighbours: h_N = 0

    def _lstm_aggregate(self, h: Tensor, src: Tensor, dst: Tensor) -> Tensor:
        n, f = h.shape
        if src.numel() == 0:
            return h.new_zeros(n, f)
        order = torch.argsort(dst * n + src)  # by target, then neighbour index: the fixed reading order
        src, dst = src[order], dst[order]
        deg = torch.bincount(dst, minlength=n)  # (N,)
        start = torch.cumsum(deg, 0) - deg
        pos = torch.arange(dst.numel(), device=h.device) - start[dst]  # position within the neighbourhood
        has = deg > 0
        nodes = torch.nonzero(has).squeeze(1)  # the nodes with neighbours, (M,)
        row = torch.full((n,), -1, dtype=torch.long, device=h.device)
        row[nodes] = torch.arange(nodes.numel(), device=h.device)
        seq = h.new_zeros(nodes.numel(), int(deg.max()), f)  # (M, max_deg, F), zero-padded at the end
        seq[row[dst], pos] = h[src]
        packed = nn.utils.rnn.pack_padded_sequence(seq, deg[nodes].cpu(), batch_first=True, enforce_sorted=False)
        _, (h_last, _) = self.lstm(packed)  # (1, M, F): the state after each node's LAST real neighbour
        out = h.new_zeros(n, f)
        out[nodes] = h_last[0]
        return out

    def forward(self, h: Tensor, edge_index: Tensor, neighbourhoods: tuple[int, int] | None = None) -> Tensor:
        out = self.linear(torch.cat([h, self.aggregate(h, edge_index, neighbourhoods)], dim=-1))  # W [h_i || h_N(i)]
        return F.normalize(out, p=2.0, dim=-1) if self.normalize else out


# ------------------------------------------------------------------------------ GAT
class GATLayer(nn.Module):
    """Multi-head graph attention. Per head k: z_i = W^k h_i (the `linear` maps to K * F_out),
    e_ij = LeakyReLU(a^T [z_i || z_j]) = LeakyReLU(a_dst . z_i + a_src . z_j) with a = [a_dst; a_src],
    alpha_ij = softmax over j in N(i) u {i} (self-loops are added), h_i' = sum_j alpha_ij z_j;
    heads concatenated (K * F_out) or averaged (F_out); + b.

    Same parameters as PyG's GATConv: `linear.weight` = lin.weight, `att_src`, `att_dst` (1, K, F_out), `bias`."""

    def __init__(self, in_features: int, out_features: int, heads: int = 1, concat: bool = True,
                 negative_slope: float = 0.2, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.heads, self.out_features, self.concat = heads, out_features, concat
        self.negative_slope, self.dropout = negative_slope, dropout
        self.linear = nn.Linear(in_features, heads * out_features, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_features))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_features))
        for p in (self.linear.weight, self.att_src, self.att_dst):
            nn.init.xavier_uniform_(p)
        self.bias = nn.Parameter(torch.zeros(heads * out_features if concat else out_features)) if bias else None

    def forward(self, h: Tensor, edge_index: Tensor, return_attention: bool = False):
        """h (N, F_in) -> (N, K*F_out) or (N, F_out); with return_attention also
        (edge_index with self-loops (2, E'), alpha (E', K))."""
        n = h.size(0)
        ei, real = with_self_loops(edge_index, n)
        src, dst = ei
        z = self.linear(h).view(n, self.heads, self.out_features)  # (N, K, F_out)
        score_src = (z * self.att_src).sum(-1)  # (N, K): a_src . z_j
        score_dst = (z * self.att_dst).sum(-1)  # (N, K): a_dst . z_i
        e = F.leaky_relu(score_dst[dst] + score_src[src], self.negative_slope)  # (E + N, K)
        e = e.masked_fill(~real[:, None], float("-inf"))  # a replaced self-loop gets alpha = 0
        alpha = segment_softmax(e, dst, n)  # (E + N, K), sums to 1 over each N(i) u {i}
        weights = F.dropout(alpha, self.dropout, self.training)  # attention dropout (the paper's, p=0.6)
        out = scatter_sum(weights.unsqueeze(-1) * z[src], dst, n)  # (N, K, F_out)
        out = out.reshape(n, -1) if self.concat else out.mean(dim=1)
        if self.bias is not None:
            out = out + self.bias
        return (out, (ei[:, real], alpha[real])) if return_attention else out
