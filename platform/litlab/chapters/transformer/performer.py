"""Performer attention: FAVOR+ (Choromanski et al., 2021), linear in the sequence length.

softmax attention's kernel exp(q.k / sqrt(d)) is estimated with positive random features
    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m),   x = q / d^(1/4) (resp. k / d^(1/4)),   W (m, d),
since E_w[exp(w.q - |q|^2/2) exp(w.k - |k|^2/2)] = exp(q.k) for w ~ N(0, I). The rows of W are
orthogonal within blocks of d (lower variance) and rescaled to chi(d)-distributed norms.
Then
    bidirectional: out = phi(Q) (phi(K)^T V) / (phi(Q) (phi(K)^T 1))         -- O(n m d) time, O(n m) memory
    causal:        out_i = phi(q_i) S_i / (phi(q_i) z_i), S_i = sum_{j<=i} phi(k_j) v_j^T, z_i = sum_{j<=i} phi(k_j)
The causal prefix sums are computed chunk by chunk: inside a chunk of C positions with the
(C, C) masked product phi(Q_c) phi(K_c)^T, across chunks with the running (m, d) state S, so no
(n, n) or (n, m, d) tensor is ever built.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The stabilised features carry an arbitrary positive scale, so no additive epsilon is used in
# the normaliser (it would not be small relative to it); only a floor against 0/0.
_TINY = torch.finfo(torch.float32).tiny


def orthogonal_gaussian(num_features: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(m, d) random matrix whose rows are orthogonal within each block of d rows and whose norms
    are those of N(0, I_d) vectors (chi(d)), as in FAVOR+."""
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        g = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(g)  # (d, d) orthonormal columns
        blocks.append(q.T)
    w = torch.cat(blocks)[:num_features]  # (m, d) unit rows
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (w * norms[:, None]).float()


def _features(x: torch.Tensor, projection: torch.Tensor, *, is_query: bool, causal: bool) -> torch.Tensor:
    """phi(x) (B, H, T, m) for x (B, H, T, d), up to a positive constant that cancels in out.

    Stabilisers (subtracted in the exponent, cancel between numerator and denominator):
    queries - their own row maximum; keys - bidirectional: the global maximum; causal: the
    data-independent bound max_j |w_j|^2 / 2 >= w.x - |x|^2/2, so no key can influence an earlier
    output, not even through rounding."""
    d = x.shape[-1]
    x = x * d ** -0.25
    wx = x @ projection.T  # (B, H, T, m)
    exponent = wx - 0.5 * (x * x).sum(-1, keepdim=True)
    if is_query:
        exponent = exponent - exponent.amax(-1, keepdim=True).detach()
    elif causal:
        exponent = exponent - 0.5 * (projection * projection).sum(-1).max()
    else:
        exponent = exponent - exponent.amax(dim=(-2, -1), keepdim=True).detach()
    return torch.exp(exponent) / math.sqrt(projection.shape[0])


def _bidirectional(qf, kf, v):
    kv = kf.transpose(-2, -1) @ v  # (B, H, m, Dh) = phi(K)^T V
    z = kf.sum(-2)  # (B, H, m) = phi(K)^T 1
    num = qf @ kv  # (B, H, Tq, Dh)
    den = (qf * z[..., None, :]).sum(-1, keepdim=True)  # (B, H, Tq, 1)
    return num / den.clamp_min(_TINY)  # den = 0 only for a query with no visible key: output 0


def _causal(qf, kf, v, chunk_size):
    """Chunked prefix sums. Keys 0..Tk-Tq-1 (a KV cache) form the initial state."""
    t_q, t_k = qf.shape[-2], kf.shape[-2]
    past = t_k - t_q
    state = kf[..., :past, :].transpose(-2, -1) @ v[..., :past, :]  # S (B, H, m, Dh)
    norm = kf[..., :past, :].sum(-2)  # z (B, H, m)
    outs = []
    for start in range(0, t_q, chunk_size):
        stop = min(start + chunk_size, t_q)
        q_c = qf[..., start:stop, :]  # (B, H, C, m)
        k_c = kf[..., past + start : past + stop, :]
        v_c = v[..., past + start : past + stop, :]
        local = torch.tril(q_c @ k_c.transpose(-2, -1))  # (B, H, C, C): j <= i inside the chunk
        num = q_c @ state + local @ v_c  # (B, H, C, Dh)
        den = (q_c * norm[..., None, :]).sum(-1, keepdim=True) + local.sum(-1, keepdim=True)
        outs.append(num / den.clamp_min(_TINY))
        state = state + k_c.transpose(-2, -1) @ v_c
        norm = norm + k_c.sum(-2)
    return torch.cat(outs, dim=-2)


def performer_attention(q, k, v, *, causal: bool = False, attn_mask: torch.Tensor | None = None,
                        projection: torch.Tensor | None = None, num_features: int = 256, seed: int = 0,
                        chunk_size: int = 128, dropout_p: float = 0.0):
    """FAVOR+ estimate of softmax attention; q (B,H,Tq,Dh), k/v (B,H,Tk,Dh) -> (B,H,Tq,Dh).

    `projection` (m, Dh) are the random features (PerformerFeatures supplies and redraws them);
    without it `num_features` rows are drawn from `seed`. `attn_mask` may only mask keys
    (broadcastable to (B, H, 1, Tk)): linear attention never forms the (Tq, Tk) matrix a general
    mask would need. Computed in float32. `dropout_p` is accepted for a uniform signature and
    ignored (there are no attention weights to drop).
    """
    del dropout_p
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError("causal attention needs Tq <= Tk")
    if projection is None:
        gen = torch.Generator().manual_seed(seed)
        projection = orthogonal_gaussian(num_features, q.shape[-1], gen)
    projection = projection.to(device=q.device, dtype=torch.float32)
    qf = _features(q, projection, is_query=True, causal=causal)  # (B, H, Tq, m)
    kf = _features(k, projection, is_query=False, causal=causal)  # (B, H, Tk, m)
    if attn_mask is not None:
        if attn_mask.dim() != 4 or attn_mask.shape[-2] != 1:
            raise ValueError("the performer backend supports key masks only: attn_mask of shape (B|1, H|1, 1, Tk)")
        kf = kf * attn_mask.to(kf.dtype).transpose(-2, -1)  # (B|1, H|1, Tk, 1): masked keys contribute 0
    out = _causal(qf, kf, v, chunk_size) if causal else _bidirectional(qf, kf, v)
    return out.to(dtype)


class PerformerFeatures(nn.Module):
    """Holds the (m, Dh) random projection of one attention layer and redraws it.

    redraw_interval: draw a fresh projection every this many training forward passes (0 = never;
    the projection is then fixed and saved with the checkpoint). At evaluation the current
    projection is used, so evaluation is deterministic.
    """

    def __init__(self, head_dim: int, num_features: int = 256, redraw_interval: int = 0, chunk_size: int = 128,
                 seed: int | None = None):
        super().__init__()
        if num_features < 1 or chunk_size < 1 or redraw_interval < 0:
            raise ValueError("num_features and chunk_size must be >= 1, redraw_interval >= 0")
        self.head_dim, self.num_features = head_dim, num_features
        self.redraw_interval, self.chunk_size = redraw_interval, chunk_size
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        self.register_buffer("projection", orthogonal_gaussian(num_features, head_dim, self.generator))
        self.calls = 0

    @torch.no_grad()
    def redraw(self) -> None:
        self.projection.copy_(orthogonal_gaussian(self.num_features, self.head_dim, self.generator))

    def attend_options(self) -> dict:
        if self.training and self.redraw_interval:
            if self.calls and self.calls % self.redraw_interval == 0:
                self.redraw()
            self.calls += 1
        return {"projection": self.projection, "chunk_size": self.chunk_size}

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, redraw_interval={self.redraw_interval}"
