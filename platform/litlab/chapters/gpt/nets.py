"""GPT: a decoder-only causal transformer language model (Radford et al. 2018/2019), plain nn.Module.

    h_0 = W_e[x] (+ W_p[positions])                     token (+ learned/sinusoidal position) embedding
    h_l = Block_l(h_{l-1}),  l = 1..L                   pre-LN blocks with causal self-attention:
          h = h + Attn(LN(h));  h = h + FFN(LN(h))       (FFN, or a mixture of experts, moe.py)
    logits = LN_f(h_L) W_e^T                            weight tying: the output projection IS W_e

Position i only attends to positions <= i, so one forward pass over (B, T) tokens yields T
next-token predictions (teacher forcing); at generation time the KV cache (sampling.py) makes each
new token cost one position.

GPT-2 initialisation: every Linear and Embedding ~ N(0, 0.02), biases 0, LayerNorm (1, 0); the
projections that write into the residual stream (attention out_proj and the FFN's second linear,
also in every expert) ~ N(0, 0.02 / sqrt(2 L)): each block adds 2 such terms to the residual, so
this keeps the variance of h_L roughly independent of the depth L.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from litlab.chapters.gpt.moe import MoEFeedForward
from litlab.chapters.gpt.sampling import generate
from litlab.chapters.transformer.layers import FeedForward, KVCache, TransformerBlock
from litlab.chapters.transformer.positional import (LearnedPositionalEmbedding, RotaryEmbedding,
                                                    SinusoidalPositionalEncoding)

RESIDUAL_PROJECTIONS = ("out_proj.weight", "linear2.weight")  # scaled by 1/sqrt(2 L) at init


class GPT(nn.Module):
    """Decoder-only LM. forward(idx (B, T) int64, caches=None) -> logits (B, T, vocab_size).

    `positional`: "learned" (GPT-2), "sinusoidal" or "rope" (rotary, applied to queries and keys in
    every layer). `n_experts` > 0 replaces the FFN of every `moe_every`-th block (the last of each
    group, as GShard) with a MoEFeedForward of `n_experts` FFNs of width d_ff, `moe_top_k` per token.
    """

    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 4, n_head: int = 4, d_model: int = 128,
                 d_ff: int | None = None, dropout: float = 0.0, positional: str = "learned",
                 backend: str = "sdpa", backend_options: dict | None = None, tie_weights: bool = True,
                 n_experts: int = 0, moe_top_k: int = 2, moe_every: int = 1, noisy_gating: bool = True,
                 capacity_factor: float | None = None, moe_dispatch: str = "auto"):
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.vocab_size, self.block_size, self.n_layer = vocab_size, block_size, n_layer
        self.tok_emb = nn.Embedding(vocab_size, d_model)  # W_e (V, D)
        self.pos_emb: nn.Module | None = None
        rope = None
        if positional == "learned":
            self.pos_emb = LearnedPositionalEmbedding(block_size, d_model)
        elif positional == "sinusoidal":
            self.pos_emb = SinusoidalPositionalEncoding(d_model, block_size)
        elif positional == "rope":
            rope = RotaryEmbedding(d_model // n_head, block_size)
        else:
            raise ValueError(f"positional must be learned, sinusoidal or rope, got {positional!r}")
        self.drop = nn.Dropout(dropout)

        def ffn(layer: int) -> nn.Module | None:
            if n_experts == 0 or (layer + 1) % moe_every:
                return None  # the block's own FeedForward
            return MoEFeedForward(d_model, n_experts, moe_top_k, lambda: FeedForward(d_model, d_ff, dropout),
                                  noisy=noisy_gating, capacity_factor=capacity_factor, dispatch=moe_dispatch)

        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_head, d_ff, dropout=dropout, norm_first=True, causal=True,
                             backend=backend, backend_options=backend_options, rope=rope, ffn=ffn(i))
            for i in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights()
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight  # one (V, D) tensor, used twice

    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and "router" not in name:  # moe.py inits its router
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.n_layer))

    # ---------------------------------------------------------------- mixture of experts
    @property
    def moe_layers(self) -> list[MoEFeedForward]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoEFeedForward)]

    def aux_loss(self) -> Tensor | None:
        """Mean load-balancing loss of the MoE layers in the last forward (None for a dense model)."""
        losses = [m.aux_loss for m in self.moe_layers if m.aux_loss is not None]
        return torch.stack(losses).mean() if losses else None

    # ---------------------------------------------------------------- forward / generation
    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters (the tied W_e counted once); non_embedding drops W_e and W_p."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if isinstance(self.pos_emb, LearnedPositionalEmbedding):
                n -= self.pos_emb.embedding.weight.numel()
            if self.lm_head.weight is not self.tok_emb.weight:
                n -= self.lm_head.weight.numel()
        return n

    def new_caches(self) -> list[KVCache]:
        return [KVCache() for _ in self.blocks]

    def forward(self, idx: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        offset = 0 if caches is None else caches[0].length  # absolute position of idx[:, 0]
        t = idx.shape[1]
        if offset + t > self.block_size:
            raise ValueError(f"sequence of {offset + t} tokens > block_size {self.block_size}: crop the context")
        h = self.tok_emb(idx)  # (B, T, D)
        if self.pos_emb is not None:
            h = self.pos_emb(h, offset)
        h = self.drop(h)
        for i, block in enumerate(self.blocks):
            h = block(h, cache=None if caches is None else caches[i])  # (B, T, D)
        return self.lm_head(self.ln_f(h))  # (B, T, V)

    def token_logprobs(self, idx: Tensor) -> Tensor:
        """idx (B, T) -> (B, T-1): log p(x_t | x_<t) for t = 1..T-1 (e.g. sequence log-likelihoods for DPO)."""
        logp = self(idx[:, :-1]).float().log_softmax(dim=-1)  # (B, T-1, V)
        return logp.gather(-1, idx[:, 1:, None]).squeeze(-1)

    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> Tensor:
        """idx (B, T0) int64 -> (B, T0 + max_new_tokens) int64; see sampling.generate."""
        return generate(self, idx, max_new_tokens, temperature, top_k, generator, use_cache)
