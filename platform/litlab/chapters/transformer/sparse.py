"""Sparse attention patterns computed blockwise: Longformer's sliding window + global tokens and
BigBird's local + global + random blocks.

Both compute attention only inside their pattern, block by block, so memory is O(n * w) (window
w) or O(n * b * (3 + r)) (block b, r random blocks) instead of O(n^2). The `*_mask` functions give
the same pattern as a dense (Tq, Tk) bool mask: the tests check the blockwise kernels against
exact attention under that mask, and decoding with a KV cache (Tq != Tk, few queries) uses it
directly since it is then only O(Tq * Tk).

Pattern (query at absolute position i, key j; both backends add causal j <= i when asked):
  sliding_window: |i - j| <= window, or j global, or i global (global tokens see and are seen by all)
  bigbird: block(j) in {block(i)-1, block(i), block(i)+1} or in block(i)'s random blocks, or
           block(j) / block(i) is one of the first `num_global_blocks` blocks
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from litlab.chapters.transformer.attention import combine_masks, math_attention


# ------------------------------------------------------------------ shared helpers
def _key_mask(attn_mask: torch.Tensor | None, t_k: int) -> torch.Tensor | None:
    """attn_mask broadcastable to (B, H, 1, Tk) -> (B|1, H|1, Tk) bool, or None."""
    if attn_mask is None:
        return None
    if attn_mask.dim() != 4 or attn_mask.shape[-2] != 1 or attn_mask.shape[-1] != t_k:
        raise ValueError("sparse backends support key masks only: attn_mask of shape (B|1, H|1, 1, Tk)")
    return attn_mask[..., 0, :]


def _masked_softmax(scores: torch.Tensor, valid: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """softmax over the last dim with -inf where not valid; rows with nothing valid -> zeros."""
    weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1).masked_fill(~valid, 0.0)
    return F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights


def _cat_masks(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate two validity masks along the key dim after broadcasting their leading dims."""
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat((a.expand(lead + a.shape[-1:]), b.expand(lead + b.shape[-1:])), dim=-1)


def _global_rows(q, k, v, rows: torch.Tensor, *, causal, key_mask, dropout_p):
    """Exact attention for the global query positions `rows` over all keys: (B, H, g, Dh)."""
    t_k = k.shape[-2]
    mask = torch.ones(len(rows), t_k, dtype=torch.bool, device=q.device)
    if causal:
        mask = torch.arange(t_k, device=q.device)[None, :] <= rows[:, None]
    mask = mask[None, None]  # (1, 1, g, Tk)
    if key_mask is not None:
        mask = mask & key_mask[..., None, :]
    return math_attention(q[..., rows, :], k, v, attn_mask=mask, dropout_p=dropout_p)


def _dense_fallback(q, k, v, pattern, *, attn_mask, dropout_p):
    mask = combine_masks(q.shape[-2], k.shape[-2], causal=False, attn_mask=attn_mask, device=q.device)
    mask = pattern if mask is None else mask & pattern
    return math_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


# ------------------------------------------------------------------ sliding window (Longformer)
def _global_index(global_tokens: int | Sequence[int], n: int, device) -> torch.Tensor:
    """global_tokens: a count (the first g positions) or explicit positions -> sorted index (g,)."""
    if isinstance(global_tokens, int):
        idx = torch.arange(min(global_tokens, n))
    else:
        idx = torch.tensor(sorted({int(i) for i in global_tokens if 0 <= int(i) < n}), dtype=torch.long)
    return idx.to(device)


def sliding_window_mask(t_q: int, t_k: int, window: int, global_tokens: int | Sequence[int] = 0,
                        causal: bool = False, device=None) -> torch.Tensor:
    """The dense (Tq, Tk) bool pattern of sliding_window_attention (queries at Tk-Tq..Tk-1)."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    is_global = torch.zeros(t_k, dtype=torch.bool, device=device)
    is_global[_global_index(global_tokens, t_k, device)] = True
    mask = ((q_pos - k_pos).abs() <= window) | is_global[None, :] | is_global[q_pos]
    return mask & (k_pos <= q_pos) if causal else mask


def sliding_window_attention(q, k, v, *, causal: bool = False, attn_mask: torch.Tensor | None = None,
                             window: int = 64, global_tokens: int | Sequence[int] = 0, dropout_p: float = 0.0):
    """Longformer attention: each query sees keys within `window` positions (one side), plus the
    global tokens; global tokens see everything. q (B,H,n,Dh) -> (B,H,n,Dh), memory O(n * window)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    t_q, n = q.shape[-2], k.shape[-2]
    if t_q != n:  # KV-cache decoding: few queries, the dense pattern is small
        pattern = sliding_window_mask(t_q, n, window, global_tokens, causal, q.device)
        return _dense_fallback(q, k, v, pattern, attn_mask=attn_mask, dropout_p=dropout_p)
    key_mask = _key_mask(attn_mask, n)
    b = window  # block size: the window of block c lies in blocks c-1, c, c+1
    nb = math.ceil(n / b)
    pad = nb * b - n
    qb = F.pad(q, (0, 0, 0, pad)).unflatten(-2, (nb, b))  # (B, H, nb, b, Dh)
    k_pad = F.pad(k, (0, 0, b, pad + b))  # one empty block either side: ((nb + 2) b, Dh)
    v_pad = F.pad(v, (0, 0, b, pad + b))
    k_win = k_pad.unfold(-2, 3 * b, b)  # (B, H, nb, Dh, 3b), a view: blocks c-1, c, c+1
    v_win = v_pad.unfold(-2, 3 * b, b)
    scores = torch.einsum("bhcqd,bhcdk->bhcqk", qb, k_win) / math.sqrt(q.shape[-1])  # (B, H, nb, b, 3b)

    dev = q.device
    q_pos = (torch.arange(nb, device=dev)[:, None] * b + torch.arange(b, device=dev))[:, :, None]  # (nb, b, 1)
    k_pos = (torch.arange(nb, device=dev)[:, None] - 1) * b + torch.arange(3 * b, device=dev)  # (nb, 3b)
    k_pos = k_pos[:, None, :]  # (nb, 1, 3b)
    g_idx = _global_index(global_tokens, n, dev)
    is_global = torch.zeros(n + 1, dtype=torch.bool, device=dev)  # slot n: out-of-range keys
    is_global[g_idx] = True
    in_range = (k_pos >= 0) & (k_pos < n)
    k_clamped = torch.where(in_range, k_pos, n)
    # global keys are attended through the global part below, not twice
    valid = in_range & ((q_pos - k_pos).abs() <= window) & ~is_global[k_clamped]
    if causal:
        valid = valid & (k_pos <= q_pos)
    if key_mask is not None:  # (B|1, H|1, n) -> gather at each window slot
        km = F.pad(key_mask, (0, 1), value=False)[..., k_clamped.expand(nb, b, 3 * b)]
        valid = valid & km  # (B|1, H|1, nb, b, 3b)

    parts_s, parts_v = [scores], []
    if len(g_idx):
        k_g, v_g = k[..., g_idx, :], v[..., g_idx, :]  # (B, H, g, Dh)
        scores_g = torch.einsum("bhcqd,bhgd->bhcqg", qb, k_g) / math.sqrt(q.shape[-1])  # (B, H, nb, b, g)
        valid_g = torch.ones(nb, b, len(g_idx), dtype=torch.bool, device=dev)  # (nb, b, g)
        if causal:
            valid_g = g_idx[None, None, :] <= q_pos
        if key_mask is not None:
            valid_g = valid_g & key_mask[..., g_idx][..., None, None, :]
        parts_s.append(scores_g)
        valid = _cat_masks(valid, valid_g)
        parts_v = [v_g]
    weights = _masked_softmax(torch.cat(parts_s, dim=-1), valid, dropout_p)  # (B, H, nb, b, 3b [+ g])
    out = torch.einsum("bhcqk,bhcdk->bhcqd", weights[..., : 3 * b], v_win)
    if parts_v:
        out = out + torch.einsum("bhcqg,bhgd->bhcqd", weights[..., 3 * b :], parts_v[0])
    out = out.flatten(2, 3)[..., :n, :]  # (B, H, n, Dh)
    if len(g_idx):  # global queries attend to every key
        rows = _global_rows(q, k, v, g_idx, causal=causal, key_mask=key_mask, dropout_p=dropout_p)
        out = out.index_copy(-2, g_idx, rows.to(out.dtype))
    return out


# ------------------------------------------------------------------ BigBird
def bigbird_blocks(num_blocks: int, num_global_blocks: int, num_random_blocks: int, seed: int,
                   causal: bool) -> torch.Tensor:
    """(nb, 3 + r) key-block index per query block (-1 = empty slot): the local blocks c-1, c, c+1
    and r random blocks, global blocks excluded (they are handled separately). The random blocks of
    block c come from a generator seeded by (seed, c); when causal they are drawn among the past
    blocks g..c-2 only, so a query's pattern never depends on the sequence length (KV cache)."""
    g, r = num_global_blocks, num_random_blocks
    table = torch.full((num_blocks, 3 + r), -1, dtype=torch.long)
    for c in range(num_blocks):
        local = [j for j in (c - 1, c, c + 1) if g <= j < num_blocks and not (causal and j > c)]
        table[c, : len(local)] = torch.tensor(local, dtype=torch.long)
        if r == 0:
            continue
        cands = [j for j in range(g, c - 1 if causal else num_blocks) if abs(j - c) > 1]
        if cands:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + c)
            pick = torch.randperm(len(cands), generator=gen)[:r]
            table[c, 3 : 3 + len(pick)] = torch.tensor(cands, dtype=torch.long)[pick]
    return table


def bigbird_mask(t_q: int, t_k: int, block_size: int = 64, num_global_blocks: int = 1, num_random_blocks: int = 3,
                 seed: int = 0, causal: bool = False, device=None) -> torch.Tensor:
    """The dense (Tq, Tk) bool pattern of bigbird_attention (queries at Tk-Tq..Tk-1)."""
    nb = math.ceil(t_k / block_size)
    table = bigbird_blocks(nb, num_global_blocks, num_random_blocks, seed, causal)
    allowed = torch.zeros(nb, nb + 1, dtype=torch.bool)  # column nb: the empty slot -1
    allowed.scatter_(1, torch.where(table < 0, nb, table), True)
    allowed = allowed[:, :nb]
    allowed[:, :num_global_blocks] = True
    allowed[:num_global_blocks, :] = True
    q_pos = torch.arange(t_k - t_q, t_k)
    k_pos = torch.arange(t_k)
    mask = allowed[q_pos[:, None] // block_size, k_pos[None, :] // block_size]
    if causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None])
    return mask.to(device)


def bigbird_attention(q, k, v, *, causal: bool = False, attn_mask: torch.Tensor | None = None, block_size: int = 64,
                      num_global_blocks: int = 1, num_random_blocks: int = 3, seed: int = 0, dropout_p: float = 0.0):
    """BigBird attention over blocks of `block_size`: each query block sees its neighbouring blocks,
    `num_random_blocks` random blocks and the first `num_global_blocks` (global) blocks, which in
    turn see everything. q (B,H,n,Dh) -> (B,H,n,Dh), memory O(n * block_size * (3 + r))."""
    if block_size < 1 or num_global_blocks < 0 or num_random_blocks < 0:
        raise ValueError("block_size must be >= 1, num_global_blocks and num_random_blocks >= 0")
    t_q, n = q.shape[-2], k.shape[-2]
    if t_q != n:  # KV-cache decoding: few queries, the dense pattern is small
        pattern = bigbird_mask(t_q, n, block_size, num_global_blocks, num_random_blocks, seed, causal, q.device)
        return _dense_fallback(q, k, v, pattern, attn_mask=attn_mask, dropout_p=dropout_p)
    key_mask = _key_mask(attn_mask, n)
    b, dev = block_size, q.device
    nb = math.ceil(n / b)
    pad = nb * b - n
    table = bigbird_blocks(nb, num_global_blocks, num_random_blocks, seed, causal).to(dev)  # (nb, S)
    slots = table.shape[1]
    qb = F.pad(q, (0, 0, 0, pad)).unflatten(-2, (nb, b))  # (B, H, nb, b, Dh)
    kb = F.pad(k, (0, 0, 0, pad)).unflatten(-2, (nb, b))
    vb = F.pad(v, (0, 0, 0, pad)).unflatten(-2, (nb, b))
    safe = table.clamp(min=0)
    k_sel = kb[:, :, safe].flatten(3, 4)  # (B, H, nb, S*b, Dh): gathered key blocks
    v_sel = vb[:, :, safe].flatten(3, 4)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bhcqd,bhckd->bhcqk", qb, k_sel) * scale  # (B, H, nb, b, S*b)

    q_pos = (torch.arange(nb, device=dev)[:, None] * b + torch.arange(b, device=dev))[:, :, None]  # (nb, b, 1)
    k_pos = (safe[:, :, None] * b + torch.arange(b, device=dev)).flatten(1)[:, None, :]  # (nb, 1, S*b)
    valid = (table >= 0).repeat_interleave(b, dim=1)[:, None, :] & (k_pos < n)  # (nb, 1, S*b)
    if causal:
        valid = valid & (k_pos <= q_pos)
    else:
        valid = valid.expand(nb, b, slots * b)
    if key_mask is not None:
        km = F.pad(key_mask, (0, 1), value=False)[..., torch.where(k_pos < n, k_pos, n).expand(nb, b, -1)]
        valid = valid & km  # (B|1, H|1, nb, b, S*b)

    n_glob = min(num_global_blocks * b, n)
    g_idx = torch.arange(n_glob, device=dev)
    parts = [scores]
    if n_glob:
        scores_g = torch.einsum("bhcqd,bhgd->bhcqg", qb, k[..., :n_glob, :]) * scale  # (B, H, nb, b, g)
        valid_g = torch.ones(nb, b, n_glob, dtype=torch.bool, device=dev)
        if causal:
            valid_g = g_idx[None, None, :] <= q_pos
        if key_mask is not None:
            valid_g = valid_g & key_mask[..., :n_glob][..., None, None, :]
        parts.append(scores_g)
        valid = _cat_masks(valid, valid_g)
    weights = _masked_softmax(torch.cat(parts, dim=-1), valid, dropout_p)
    out = torch.einsum("bhcqk,bhckd->bhcqd", weights[..., : slots * b], v_sel)
    if n_glob:
        out = out + torch.einsum("bhcqg,bhgd->bhcqd", weights[..., slots * b :], v[..., :n_glob, :])
    out = out.flatten(2, 3)[..., :n, :]  # (B, H, n, Dh)
    if n_glob:  # global query blocks attend to every key
        rows = _global_rows(q, k, v, g_idx, causal=causal, key_mask=key_mask, dropout_p=dropout_p)
        out = torch.cat((rows.to(out.dtype), out[..., n_glob:, :]), dim=-2)
    return out
