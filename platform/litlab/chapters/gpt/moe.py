"""Chapter 12, LLM techniques: a sparsely-gated mixture-of-experts feed-forward layer.

Shazeer et al. 2017 ("Outrageously large neural networks"), as used by GShard / Switch / Mixtral:
E expert FFNs, and a router that sends each token to only k of them, so the parameter count grows
with E while the compute per token stays ~k FFNs.

Router (noisy top-k gating), for a token x (D,):
    H(x)_i = (x W_g)_i + eps_i * softplus((x W_noise)_i),  eps ~ N(0, 1)   (noise at train time only)
    G(x)   = Softmax(KeepTopK(H(x), k))   (entries outside the top k are -inf -> gate 0)
    y      = sum_{i in TopK} G(x)_i * E_i(x)
The noise term lets a token sometimes try its (k+1)-th expert, which helps load balancing; its
scale softplus(x W_noise) is learned (W_noise starts at 0, i.e. noise std softplus(0) = 0.69).

Load-balancing auxiliary loss (Switch Transformer, Fedus et al. 2021; GShard), over the N tokens of a
batch:
    f_i = (number of routing slots that chose expert i) / (N k)     (dispatch fraction, sum_i f_i = 1)
    P_i = (1/N) sum_x softmax(H(x))_i                                (mean router probability)
    L_aux = E * sum_i f_i P_i
f is a count (no gradient); the gradient flows through P, pushing probability away from overloaded
experts. With uniform routing f_i = P_i = 1/E and L_aux = 1; if routing follows the probabilities
(f = P) then L_aux = E ||P||^2 >= 1 by Cauchy-Schwarz, with equality only when uniform.

Capacity (optional, training only): each expert takes at most C = ceil(capacity_factor * N k / E)
of a batch's assignments; first choices are served before second choices (slot-major priority,
GShard); an assignment over capacity is dropped (that expert's term is missing from y; the residual
stream still carries x). It bounds the work per expert in a training step. In eval mode (validation,
generation) every token reaches its k experts, so a token's output does not depend on the other
tokens of the batch, and KV-cache decoding gives the same result as a full forward.

Dispatch uses batched index ops (a loop over experts, not over tokens), and the gated outputs are
added back to their tokens with index_add_. With a capacity C (training), each expert gets a buffer
of C rows (GShard): shapes fixed by N, k, E and C, nothing read from the device, at the price of
running the experts on the buffers' empty rows too. Without one (or with dispatch="grouped"), the
kept assignments are sorted by expert and split into E groups, whose sizes are read from the device
(a host sync per MoE layer). dispatch="auto" uses the buffers on an accelerator, where a sync stalls
the queue of kernels, and the groups on a CPU, where reading is free and the empty rows are not
(1.5x the time of an MoE layer at capacity 1.5). Both give the same output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# "buffers": GShard's fixed-size expert buffers whenever there is a capacity (no host sync);
# "grouped": groups sized on the host; "auto": buffers on an accelerator, grouped on a CPU
DISPATCH = ("auto", "buffers", "grouped")


@dataclass
class Routing:
    logits: Tensor  # (N, E) H(x): noisy at train time (if noisy), clean otherwise
    probs: Tensor  # (N, E) softmax(H(x)) over all experts (for the aux loss)
    expert_index: Tensor  # (N, k) the chosen experts, best first
    gates: Tensor  # (N, k) Softmax(KeepTopK(H(x), k)) at the chosen experts, rows sum to 1


class NoisyTopKRouter(nn.Module):
    def __init__(self, d_model: int, n_experts: int, top_k: int, noisy: bool = True):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"need 1 <= top_k <= n_experts, got top_k={top_k}, n_experts={n_experts}")
        self.n_experts, self.top_k = n_experts, top_k
        self.w_gate = nn.Linear(d_model, n_experts, bias=False)  # W_g
        self.w_noise = nn.Linear(d_model, n_experts, bias=False) if noisy else None  # W_noise
        nn.init.normal_(self.w_gate.weight, std=0.02)
        if self.w_noise is not None:
            nn.init.zeros_(self.w_noise.weight)

    def forward(self, x: Tensor) -> Routing:
        clean = self.w_gate(x)  # (N, E)
        logits = clean
        if self.w_noise is not None and self.training:
            logits = clean + torch.randn_like(clean) * F.softplus(self.w_noise(x))  # H(x)
        top_logits, expert_index = logits.topk(self.top_k, dim=-1)  # (N, k) KeepTopK
        gates = top_logits.softmax(dim=-1)  # softmax over the kept k (the others are -inf -> 0)
        return Routing(logits, logits.softmax(dim=-1), expert_index, gates)


def expert_counts(expert_index: Tensor, n_experts: int) -> Tensor:
    """(E,) int64: how many entries of expert_index (any shape) name each expert. A scatter-add, not
    torch.bincount, which reads the largest index back from a GPU to size its output."""
    index = expert_index.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=index.device).scatter_add_(0, index, torch.ones_like(index))


def queue_positions(expert_of: Tensor, n_experts: int) -> Tensor:
    """expert_of (A,) -> (A,) each assignment's place in its expert's queue, in the order given
    (0 = first): the number of earlier assignments to the same expert."""
    onehot = (expert_of[:, None] == torch.arange(n_experts, device=expert_of.device)).long()  # (A, E)
    return (onehot.cumsum(0) * onehot).sum(-1) - 1


def load_balancing_loss(probs: Tensor, expert_index: Tensor, n_experts: int) -> Tensor:
    """L_aux = E * sum_i f_i P_i, f_i = share of the N k routing slots sent to expert i (no gradient),
    P_i = mean router probability of expert i; probs (N, E), expert_index (N, k)."""
    f = expert_counts(expert_index, n_experts).to(probs.dtype) / expert_index.numel()  # (E,) sums to 1
    p = probs.mean(dim=0)  # (E,)
    return n_experts * (f * p).sum()


class MoEFeedForward(nn.Module):
    """A drop-in FFN (x (B, T, D) -> (B, T, D)) for TransformerBlock(ffn=...).

    After each forward: `.aux_loss` (scalar tensor, L_aux above), `.load` ((E,) float, detached:
    routing slots per expert before any capacity drop; f = load / load.sum()) and `.dropped` (scalar:
    assignments dropped for capacity).
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, expert: Callable[[], nn.Module], *,
                 noisy: bool = True, capacity_factor: float | None = None, dispatch: str = "auto"):
        super().__init__()
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch must be one of {DISPATCH}, got {dispatch!r}")
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.dispatch = dispatch
        self.router = NoisyTopKRouter(d_model, n_experts, top_k, noisy)
        self.experts = nn.ModuleList(expert() for _ in range(n_experts))
        self.aux_loss: Tensor | None = None
        self.load: Tensor | None = None
        self.dropped: Tensor | None = None

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments each expert may take from a batch of n_tokens (None: unlimited, or eval mode)."""
        if self.capacity_factor is None or not self.training:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        n, e, k = x.shape[0], self.n_experts, self.top_k
        r = self.router(x)
        self.aux_loss = load_balancing_loss(r.probs, r.expert_index, e)

        # one row per (slot, token) assignment, slot-major: all first choices, then all second, ...
        expert_of = r.expert_index.t().reshape(-1)  # (k N,)
        token_of = torch.arange(n, device=x.device).repeat(k)  # (k N,)
        gate_of = r.gates.t().reshape(-1)  # (k N,)
        counts = expert_counts(expert_of, e)  # (E,) assignments per expert, before any drop
        self.load = counts.float()
        capacity = self.capacity(n)
        if capacity is None:
            self.dropped = x.new_zeros(())
            out = self._grouped(x, expert_of, token_of, gate_of, counts)
        else:
            position = queue_positions(expert_of, e)
            keep = position < capacity
            self.dropped = (~keep).sum().detach().float()
            if self.dispatch == "buffers" or (self.dispatch == "auto" and x.device.type != "cpu"):
                out = self._in_buffers(x, expert_of, token_of, gate_of, position, keep, capacity)
            else:  # a CPU reads the kept count for free, and runs no expert on empty rows
                out = self._grouped(x, expert_of[keep], token_of[keep], gate_of[keep])
        return out.reshape(*shape[:-1], out.shape[-1])

    def _grouped(self, x: Tensor, expert_of: Tensor, token_of: Tensor, gate_of: Tensor,
                 counts: Tensor | None = None) -> Tensor:
        """Every assignment served: each expert runs once on its group (sizes read from the device;
        `counts`: the group sizes when the caller has them)."""
        order = torch.argsort(expert_of, stable=True)  # group the assignments by expert
        if counts is None:
            counts = expert_counts(expert_of, self.n_experts)
        counts = counts.tolist()  # a host sync per layer
        tokens_by_expert = token_of[order].split(counts)
        gates_by_expert = gate_of[order].split(counts)
        out = None
        for expert, tokens, gates in zip(self.experts, tokens_by_expert, gates_by_expert):
            if tokens.numel() == 0:
                continue
            y = expert(x[tokens]) * gates[:, None]  # (n_i, D) gated expert output
            if out is None:
                out = torch.zeros(x.shape[0], y.shape[-1], dtype=y.dtype, device=x.device)
            out.index_add_(0, tokens, y.to(out.dtype))  # y_t += G(x_t)_i E_i(x_t)
        return out if out is not None else torch.zeros_like(x)

    def _in_buffers(self, x: Tensor, expert_of: Tensor, token_of: Tensor, gate_of: Tensor, position: Tensor,
                    keep: Tensor, capacity: int) -> Tensor:
        """GShard's dispatch: each expert gets a buffer of `capacity` rows, filled in queue order
        (`position`); the assignments not kept are dropped. Every shape depends only on N, E, k and
        C, so nothing is read from the device (an unfilled row runs the expert on zeros, unused)."""
        e, c, d = self.n_experts, capacity, x.shape[-1]
        row = torch.where(keep, expert_of * c + position, e * c)  # (k N,) buffer row; e c: the spill row
        token_at = torch.full((e * c + 1,), x.shape[0], dtype=torch.long, device=x.device)  # N: a zero row
        token_at.scatter_(0, row, token_of)  # (E C + 1,) the token in each buffer row
        x_padded = torch.cat([x, x.new_zeros(1, d)])  # (N + 1, D)
        buffers = x_padded[token_at[:-1]].view(e, c, d)  # (E, C, D)
        y = torch.cat([expert(buffers[i]) for i, expert in enumerate(self.experts)])  # (E C, D')
        y_assigned = y[row.clamp_max(e * c - 1)] * gate_of[:, None]  # (k N, D') gated expert outputs
        y_assigned = torch.where(keep[:, None], y_assigned, 0)  # a dropped assignment adds nothing
        out = x.new_zeros(x.shape[0], y.shape[-1], dtype=y.dtype)
        return out.index_add_(0, token_of, y_assigned.to(out.dtype))  # y_t += G(x_t)_i E_i(x_t) over kept assignments
