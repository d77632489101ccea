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

Dispatch uses batched index ops: sort the N k assignments by expert, split them into E groups, run
each expert once on its group (a loop over experts, not over tokens) and scatter-add the gated
outputs back with index_add_.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def load_balancing_loss(probs: Tensor, expert_index: Tensor, n_experts: int) -> Tensor:
    """L_aux = E * sum_i f_i P_i, f_i = share of the N k routing slots sent to expert i (no gradient),
    P_i = mean router probability of expert i; probs (N, E), expert_index (N, k)."""
    counts = torch.bincount(expert_index.reshape(-1), minlength=n_experts)  # (E,)
    f = counts.to(probs.dtype) / expert_index.numel()  # (E,) sums to 1
    p = probs.mean(dim=0)  # (E,)
    return n_experts * (f * p).sum()


class MoEFeedForward(nn.Module):
    """A drop-in FFN (x (B, T, D) -> (B, T, D)) for TransformerBlock(ffn=...).

    After each forward: `.aux_loss` (scalar tensor, L_aux above), `.load` ((E,) float, detached:
    routing slots per expert before any capacity drop; f = load / load.sum()) and `.dropped` (scalar:
    assignments dropped for capacity).
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, expert: Callable[[], nn.Module], *,
                 noisy: bool = True, capacity_factor: float | None = None):
        super().__init__()
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
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
        self.load = torch.bincount(expert_of, minlength=e).detach().float()  # (E,)
        self.dropped = x.new_zeros(())
        capacity = self.capacity(n)
        if capacity is not None:
            onehot = F.one_hot(expert_of, e)  # (k N, E)
            position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # place of each assignment in its expert's queue
            keep = position < capacity
            self.dropped = (~keep).sum().detach().float()
            expert_of, token_of, gate_of = expert_of[keep], token_of[keep], gate_of[keep]

        order = torch.argsort(expert_of, stable=True)  # group the assignments by expert
        counts = torch.bincount(expert_of, minlength=e).tolist()  # one host sync per layer
        tokens_by_expert = token_of[order].split(counts)
        gates_by_expert = gate_of[order].split(counts)
        out = None
        for expert, tokens, gates in zip(self.experts, tokens_by_expert, gates_by_expert):
            if tokens.numel() == 0:
                continue
            y = expert(x[tokens]) * gates[:, None]  # (n_i, D) gated expert output
            if out is None:
                out = torch.zeros(n, y.shape[-1], dtype=y.dtype, device=x.device)
            out.index_add_(0, tokens, y.to(out.dtype))  # y_t += G(x_t)_i E_i(x_t)
        if out is None:  # everything dropped
            out = torch.zeros_like(x)
        return out.reshape(*shape[:-1], out.shape[-1])
