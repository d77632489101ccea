"""Transformer layers: multi-head attention (any backend, RoPE, KV cache), feed-forward, and the
encoder/decoder block in both the course's post-LN and the pre-LN arrangement.

Plain nn.Modules (tensors in, tensors out); shared by the translation, GPT, BERT and retrieval
models. Shapes: B batch, T query length, S key/context length, D model width, H heads, Dh = D/H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from litlab.chapters.transformer.attention import BACKENDS, attend
from litlab.chapters.transformer.positional import RotaryEmbedding


class KVCache:
    """Keys and values of the positions decoded so far, one cache per layer.

    `append(k, v)` concatenates the new (B, H, T_new, Dh) keys/values and returns the full
    (B, H, T_total, Dh) ones. A decoder block keeps its cross-attention keys/values (computed once
    from the encoder output) in `cache.cross`, a nested KVCache.
    """

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.cross: KVCache | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k), dim=-2)
            self.v = torch.cat((self.v, v), dim=-2)
        return self.k, self.v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search / dropping finished sequences)."""
        if self.k is not None:
            self.k, self.v = self.k[index], self.v[index]
        if self.cross is not None:
            self.cross.reorder(index)

    def reset(self) -> None:
        self.k = self.v = None
        self.cross = None


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_H) W^O, head_h = Attention(Q W^Q_h, K W^K_h, V W^V_h).

    Self-attention when `context` is None, else cross-attention with keys/values from `context`.
    `backend` picks the attention kernel (attention.py); `rope` rotates queries and keys of
    self-attention; `cache` makes decoding incremental. `return_weights=True` computes this call
    with the exact `math` backend so that the (B, H, T, S) weights can be returned.
    """

    def __init__(self, d_model: int, n_heads: int, *, backend: str = "sdpa", dropout: float = 0.0,
                 bias: bool = True, rope: RotaryEmbedding | None = None, backend_options: dict | None = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.backend, self.dropout, self.rope = backend, dropout, rope
        self.backend_options = dict(backend_options or {})
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.features = None
        if backend == "performer":  # the random-feature matrix lives in (and is redrawn by) the module
            from litlab.chapters.transformer.performer import PerformerFeatures

            self.features = PerformerFeatures(self.head_dim, **self.backend_options)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, D) -> (B, H, T, Dh)
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def _keys_values(self, x, context, cache):
        if context is None:  # self-attention: new keys at positions offset.. (after the cached ones)
            offset = 0 if cache is None else cache.length
            k, v = self._split(self.k_proj(x)), self._split(self.v_proj(x))
            if self.rope is not None:
                k = self.rope.rotate(k, offset)
            if cache is not None:
                k, v = cache.append(k, v)
            return k, v, offset
        if cache is not None and cache.length:  # cross-attention: the context is encoded once
            return cache.k, cache.v, 0
        k, v = self._split(self.k_proj(context)), self._split(self.v_proj(context))
        if cache is not None:
            cache.append(k, v)
        return k, v, 0

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *, causal: bool = False,
                key_padding_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                return_weights: bool = False):
        k, v, offset = self._keys_values(x, context, cache)  # (B, H, S, Dh)
        q = self._split(self.q_proj(x))  # (B, H, T, Dh)
        if self.rope is not None and context is None:
            q = self.rope.rotate(q, offset)
        attn_mask = None
        if key_padding_mask is not None:  # (B, S) True = padding -> (B, 1, 1, S) True = may attend
            attn_mask = ~key_padding_mask[:, None, None, :]
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if return_weights:
            out, weights = attend(q, k, v, backend="math", causal=causal, attn_mask=attn_mask,
                                  dropout_p=dropout_p, return_weights=True)
        else:
            options = dict(self.backend_options)
            if self.features is not None:
                options = self.features.attend_options()
            out = attend(q, k, v, backend=self.backend, causal=causal, attn_mask=attn_mask,
                         dropout_p=dropout_p, **options)
        b, _, t, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, self.d_model))  # (B, T, D)
        return (out, weights) if return_weights else out


class FeedForward(nn.Module):
    """FFN(x) = W_2 act(W_1 x + b_1) + b_2, applied to every position independently."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = F.gelu if activation == "gelu" else F.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))  # (B, T, D)


class TransformerBlock(nn.Module):
    """One encoder block (self-attention + FFN) or decoder block (masked self-attention +
    cross-attention + FFN) with residual connections.

    norm_first=False, the course's post-LN:  x = LN(x + Sublayer(x))
    norm_first=True,  pre-LN:                x = x + Sublayer(LN(x))

    `cross_backend` (optional) is the kernel of the cross-attention; by default the block's
    backend, except that the local-pattern backends (sliding_window, bigbird), which have no
    meaning between two different sequences, fall back to sdpa there.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, *, dropout: float = 0.0, norm_first: bool = True,
                 causal: bool = False, cross_attention: bool = False, backend: str = "sdpa",
                 backend_options: dict | None = None, rope: RotaryEmbedding | None = None,
                 ffn: nn.Module | None = None, activation: str = "gelu", cross_backend: str | None = None,
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        self.norm_first, self.causal = norm_first, causal
        self.keep_weights = False
        self.attn_weights: torch.Tensor | None = None  # (B, H, T, T) when keep_weights
        self.cross_attn_weights: torch.Tensor | None = None  # (B, H, T, S) when keep_weights
        self.self_attn = MultiHeadAttention(d_model, n_heads, backend=backend, dropout=dropout, rope=rope,
                                            backend_options=backend_options)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.cross_attn = self.norm_cross = self.dropout_cross = None
        if cross_attention:
            if cross_backend is None:
                cross_backend = backend if backend in ("math", "sdpa", "performer") else "sdpa"
            cross_options = backend_options if cross_backend == backend else None
            self.cross_attn = MultiHeadAttention(d_model, n_heads, backend=cross_backend, dropout=dropout,
                                                 backend_options=cross_options)
            self.norm_cross = nn.LayerNorm(d_model, eps=layer_norm_eps)
            self.dropout_cross = nn.Dropout(dropout)
        self.ffn = ffn if ffn is not None else FeedForward(d_model, d_ff, dropout, activation)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout2 = nn.Dropout(dropout)

    def _self_attention(self, x, key_padding_mask, cache):
        if self.keep_weights:
            out, self.attn_weights = self.self_attn(x, causal=self.causal, key_padding_mask=key_padding_mask,
                                                    cache=cache, return_weights=True)
            self.attn_weights = self.attn_weights.detach()
            return out
        return self.self_attn(x, causal=self.causal, key_padding_mask=key_padding_mask, cache=cache)

    def _cross_attention(self, x, context, context_padding_mask, cache):
        cross_cache = None
        if cache is not None:
            cache.cross = cache.cross or KVCache()
            cross_cache = cache.cross
        if self.keep_weights:
            out, weights = self.cross_attn(x, context, key_padding_mask=context_padding_mask, cache=cross_cache,
                                           return_weights=True)
            self.cross_attn_weights = weights.detach()
            return out
        return self.cross_attn(x, context, key_padding_mask=context_padding_mask, cache=cross_cache)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, context_padding_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        if self.cross_attn is not None and context is None:
            raise ValueError("a block with cross_attention needs `context` (the encoder output)")
        if self.norm_first:  # pre-LN: x + Sublayer(LN(x))
            x = x + self.dropout1(self._self_attention(self.norm1(x), key_padding_mask, cache))
            if self.cross_attn is not None:
                x = x + self.dropout_cross(self._cross_attention(self.norm_cross(x), context,
                                                                 context_padding_mask, cache))
            return x + self.dropout2(self.ffn(self.norm2(x)))
        # post-LN (course): LN(x + Sublayer(x))
        x = self.norm1(x + self.dropout1(self._self_attention(x, key_padding_mask, cache)))
        if self.cross_attn is not None:
            x = self.norm_cross(x + self.dropout_cross(self._cross_attention(x, context, context_padding_mask,
                                                                              cache)))
        return self.norm2(x + self.dropout2(self.ffn(x)))
