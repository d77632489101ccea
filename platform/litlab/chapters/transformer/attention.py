"""Scaled dot-product attention with interchangeable backends.

    attend(q, k, v, backend="math" | "sdpa" | "performer" | "sliding_window" | "bigbird", ...)

All backends take q (B, H, Tq, Dh), k and v (B, H, Tk, Dh) and return (B, H, Tq, Dh).

- `math`: the course formula softmax(Q K^T / sqrt(d_k)) V, masks applied as -inf before the
  softmax. The only backend that can return the (B, H, Tq, Tk) attention weights.
- `sdpa`: torch.nn.functional.scaled_dot_product_attention (fused flash / memory-efficient /
  cuDNN kernels on GPU, same maths).
- `performer`: FAVOR+ linear attention with positive orthogonal random features (performer.py).
- `sliding_window`: Longformer local window + global tokens, computed blockwise (sparse.py).
- `bigbird`: local + global + random blocks, computed blockwise (sparse.py).

Masks: `attn_mask` is bool, broadcastable to (B, H, Tq, Tk), True = may attend. `causal=True`
lets query i see keys j <= i; with Tq < Tk (decoding with a KV cache) query i sits at absolute
position Tk - Tq + i. A query row that may attend to nothing outputs zeros (as torch's SDPA does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("math", "sdpa", "performer", "sliding_window", "bigbird")


def causal_mask(t_q: int, t_k: int, device=None) -> torch.Tensor:
    """(Tq, Tk) bool, True where key j <= absolute query position Tk - Tq + i."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    return k_pos <= q_pos


def combine_masks(t_q: int, t_k: int, *, causal: bool, attn_mask: torch.Tensor | None, device=None):
    """The bool "may attend" mask for causal and/or attn_mask, or None when everything is allowed."""
    mask = causal_mask(t_q, t_k, device) if causal else None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise TypeError("attn_mask must be a bool tensor (True = may attend)")
        mask = attn_mask if mask is None else attn_mask & mask
    return mask


def math_attention(q, k, v, *, causal=False, attn_mask=None, dropout_p=0.0, return_weights=False):
    """softmax(Q K^T / sqrt(d_k) + M) V with M = -inf where masked."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    mask = combine_masks(t_q, t_k, causal=causal, attn_mask=attn_mask, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        # fully masked rows give 0/0 = nan; they attend to nothing and output zeros (like SDPA)
        weights = weights.masked_fill(~mask, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = weights @ v  # (B, H, Tq, Dh)
    return (out, weights) if return_weights else out


def sdpa_attention(q, k, v, *, causal=False, attn_mask=None, dropout_p=0.0):
    t_q, t_k = q.shape[-2], k.shape[-2]
    if causal and attn_mask is None and t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    # torch's is_causal aligns the mask top-left; with a KV cache (Tq < Tk) we need bottom-right
    mask = combine_masks(t_q, t_k, causal=causal, attn_mask=attn_mask, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def attend(q, k, v, *, backend: str = "sdpa", causal: bool = False, attn_mask: torch.Tensor | None = None,
           dropout_p: float = 0.0, return_weights: bool = False, **backend_options):
    """Attention of q (B,H,Tq,Dh) over k, v (B,H,Tk,Dh) -> (B,H,Tq,Dh) (and weights for `math`).

    `dropout_p` drops attention weights (math, sdpa); pass 0 in eval mode. `backend_options` go to
    the efficient backends (performer: num_features, projection, chunk_size, seed; sliding_window:
    window, global_tokens; bigbird: block_size, num_global_blocks, num_random_blocks, seed).
    """
    if return_weights and backend != "math":
        raise ValueError(f"only the math backend returns attention weights (got backend={backend!r})")
    if backend == "math":
        _no_options(backend, backend_options)
        return math_attention(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p,
                              return_weights=return_weights)
    if backend == "sdpa":
        _no_options(backend, backend_options)
        return sdpa_attention(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p)
    if backend == "performer":
        from litlab.chapters.transformer.performer import performer_attention

        return performer_attention(q, k, v, causal=causal, attn_mask=attn_mask, **backend_options)
    if backend == "sliding_window":
        from litlab.chapters.transformer.sparse import sliding_window_attention

        return sliding_window_attention(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p,
                                        **backend_options)
    if backend == "bigbird":
        from litlab.chapters.transformer.sparse import bigbird_attention

        return bigbird_attention(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p,
                                 **backend_options)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def _no_options(backend: str, options: dict) -> None:
    if options:
        raise TypeError(f"backend {backend!r} takes no options, got {sorted(options)}")
