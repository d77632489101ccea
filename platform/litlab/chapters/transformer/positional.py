"""Positional encodings: sinusoidal (Vaswani et al.), learned, and rotary (RoPE, Su et al.).

Sinusoidal and learned add a (T, D) table to the token embeddings; `offset` is the absolute
position of x[:, 0] (non-zero while decoding with a KV cache). RoPE instead rotates each pair of
query/key features by an angle proportional to the position, so that q_m . k_n depends only on
the offset m - n.
"""

from __future__ import annotations

import torch
from torch import nn


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)); (max_len, d)."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # (L, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (ceil(d/2),)
    angle = pos / torch.pow(10000.0, two_i / d_model)  # (L, ceil(d/2))
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return pe.float()


class SinusoidalPositionalEncoding(nn.Module):
    def __init__(self, d_model: int, max_len: int = 4096):
        super().__init__()
        self.max_len = max_len
        self.register_buffer("pe", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = x.shape[1]  # x: (B, T, D)
        if offset + t > self.max_len:
            raise ValueError(f"positions up to {offset + t} exceed max_len={self.max_len}")
        return x + self.pe[offset : offset + t].to(x.dtype)


class LearnedPositionalEmbedding(nn.Module):
    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len = max_len
        self.embedding = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = x.shape[1]  # x: (B, T, D)
        if offset + t > self.max_len:
            raise ValueError(f"positions up to {offset + t} exceed max_len={self.max_len}")
        positions = torch.arange(offset, offset + t, device=x.device)
        return x + self.embedding(positions).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding: feature pair (2i, 2i+1) at position m is rotated by m * theta_i,
    theta_i = base^(-2i/Dh). Applied to queries and keys (not values) inside attention."""

    def __init__(self, head_dim: int, max_len: int = 4096, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        self.head_dim, self.max_len, self.base = head_dim, max_len, base
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (Dh/2,)
        angle = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq  # (L, Dh/2)
        self.register_buffer("cos", angle.cos().float(), persistent=False)
        self.register_buffer("sin", angle.sin().float(), persistent=False)

    def rotate(self, t: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """t (B, H, T, Dh) at absolute positions offset..offset+T-1 -> rotated (B, H, T, Dh)."""
        n = t.shape[-2]
        if offset + n > self.max_len:
            raise ValueError(f"positions up to {offset + n} exceed max_len={self.max_len}")
        cos = self.cos[offset : offset + n].to(t.dtype)  # (T, Dh/2)
        sin = self.sin[offset : offset + n].to(t.dtype)
        even, odd = t[..., 0::2], t[..., 1::2]
        # 2-d rotation of each pair: [x0, x1] -> [x0 cos - x1 sin, x0 sin + x1 cos]
        rot_even = even * cos - odd * sin
        rot_odd = even * sin + odd * cos
        return torch.stack((rot_even, rot_odd), dim=-1).flatten(-2)

    def forward(self, t: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self.rotate(t, offset)


def build_positional(kind: str, d_model: int, max_len: int) -> nn.Module | None:
    """The additive encoding for `kind` ("sinusoidal" | "learned"), or None for "rope"."""
    if kind == "sinusoidal":
        return SinusoidalPositionalEncoding(d_model, max_len)
    if kind == "learned":
        return LearnedPositionalEmbedding(max_len, d_model)
    if kind == "rope":
        return None
    raise ValueError(f"unknown positional encoding {kind!r}")

