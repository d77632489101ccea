"""The encoder-decoder transformer (Vaswani et al., 2017) for the generated seq2seq tasks.

    memory = Encoder(Embed(src) * sqrt(d) + PE)                 n_layers self-attention blocks
    logits = W_out Decoder(Embed(tgt_in) * sqrt(d) + PE, memory)  n_layers masked-self + cross blocks

Plain nn.Module; source and target share one vocabulary (litlab.data.seq2seq_tasks.Vocab), hence
one embedding, tied to the output projection. Greedy decoding runs the decoder one token at a time
with a KV cache per layer (the cross-attention keys/values of the memory are computed once).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from litlab.chapters.transformer.layers import KVCache, TransformerBlock
from litlab.chapters.transformer.positional import RotaryEmbedding, build_positional
from litlab.data.seq2seq_tasks import BOS, EOS, PAD


class TransformerEncoderDecoder(nn.Module):
    def __init__(self, vocab_size: int, d_model: int = 64, n_heads: int = 4, n_layers: int = 2, d_ff: int = 256,
                 dropout: float = 0.1, norm_first: bool = True, positional: str = "sinusoidal",
                 backend: str = "sdpa", backend_options: dict | None = None, max_len: int = 512,
                 activation: str = "gelu"):
        super().__init__()
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)  # x sqrt(d) below: unit-variance inputs
        with torch.no_grad():
            self.embed.weight[PAD].zero_()
        self.pos = build_positional(positional, d_model, max_len)  # None for rope
        rope = RotaryEmbedding(d_model // n_heads, max_len) if positional == "rope" else None
        common = dict(dropout=dropout, norm_first=norm_first, backend=backend, backend_options=backend_options,
                      rope=rope, activation=activation)
        self.encoder = nn.ModuleList(TransformerBlock(d_model, n_heads, d_ff, **common) for _ in range(n_layers))
        self.decoder = nn.ModuleList(TransformerBlock(d_model, n_heads, d_ff, causal=True, cross_attention=True,
                                                      **common) for _ in range(n_layers))
        # pre-LN leaves the residual stream un-normalised: a final LayerNorm on each stack
        self.encoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, vocab_size)
        self.out.weight = self.embed.weight  # tied input/output embedding

    def _embed(self, tokens: Tensor, offset: int = 0) -> Tensor:
        x = self.embed(tokens) * math.sqrt(self.d_model)  # (B, T, D)
        if self.pos is not None:
            x = self.pos(x, offset)
        return self.dropout(x)

    def encode(self, src: Tensor, src_pad: Tensor) -> Tensor:
        """src (B, S), src_pad (B, S) True at padding -> memory (B, S, D)."""
        h = self._embed(src)
        for block in self.encoder:
            h = block(h, key_padding_mask=src_pad)
        return self.encoder_norm(h)

    def decode(self, tgt_in: Tensor, memory: Tensor, src_pad: Tensor, caches: list[KVCache] | None = None,
               offset: int = 0) -> Tensor:
        """tgt_in (B, T) starting at position `offset` -> logits (B, T, V). With `caches`, the
        earlier positions come from the caches and tgt_in holds only the new tokens."""
        h = self._embed(tgt_in, offset)
        for i, block in enumerate(self.decoder):
            h = block(h, memory, context_padding_mask=src_pad, cache=None if caches is None else caches[i])
        return self.out(self.decoder_norm(h))

    @staticmethod
    def padding_mask(src: Tensor, src_len: Tensor) -> Tensor:
        return torch.arange(src.shape[1], device=src.device)[None, :] >= src_len[:, None]  # (B, S)

    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: logits (B, T, V) for every target position at once (causal decoder)."""
        src_pad = self.padding_mask(src, src_len)
        return self.decode(tgt_in, self.encode(src, src_pad), src_pad)

    @torch.no_grad()
    def greedy(self, src: Tensor, src_len: Tensor, max_len: int, *, use_cache: bool = True,
               keep_weights: bool = False) -> tuple[Tensor, list[Tensor] | None]:
        """Greedy tokens (B, L) (PAD after EOS) and, with keep_weights, one cross-attention tensor
        (B, H, L, S) per decoder layer (computed with exact attention)."""
        src_pad = self.padding_mask(src, src_len)
        memory = self.encode(src, src_pad)
        b = src.shape[0]
        caches = [KVCache() for _ in self.decoder] if use_cache else None
        prefix = torch.full((b, 1), BOS, dtype=torch.long, device=src.device)
        finished = torch.zeros(b, dtype=torch.bool, device=src.device)
        tokens, weights = [], [[] for _ in self.decoder]
        for block in self.decoder:
            block.keep_weights = keep_weights
        try:
            for t in range(max_len):
                if use_cache:  # only the newest token goes through the decoder
                    logits = self.decode(prefix[:, -1:], memory, src_pad, caches, offset=t)
                else:  # the whole prefix again (what the cache saves)
                    logits = self.decode(prefix, memory, src_pad)
                nxt = logits[:, -1].argmax(-1)  # (B,)
                nxt = torch.where(finished, torch.full_like(nxt, PAD), nxt)
                tokens.append(nxt)
                for i, block in enumerate(self.decoder):
                    if keep_weights:
                        weights[i].append(block.cross_attn_weights[:, :, -1:])  # (B, H, 1, S)
                finished = finished | (nxt == EOS)
                prefix = torch.cat((prefix, nxt[:, None]), dim=1)
                if bool(finished.all()):
                    break
        finally:
            for block in self.decoder:
                block.keep_weights = False
        cross = [torch.cat(w, dim=2) for w in weights] if keep_weights else None
        return torch.stack(tokens, dim=1), cross
