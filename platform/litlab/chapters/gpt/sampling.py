"""Autoregressive decoding for a causal language model: temperature, top-k, greedy, KV cache.

Next-token distribution from the last position's logits z (V,):
    temperature tau > 0:  p = softmax(z / tau)  (tau < 1 sharpens, tau > 1 flattens)
    top-k:                logits below the k-th largest are set to -inf before the softmax
    tau = 0:              greedy, argmax z (no randomness)

KV cache: at step t only the new token's query, key and value are computed; the keys and values of
the earlier tokens are read from the cache (one KVCache per layer), so a step costs O(t) instead of
re-running the whole prefix. The model sees at most `block_size` tokens: when the sequence is
longer, the context is cropped to its last block_size tokens. Cropping shifts every position, so
the cached keys/values (computed at the old positions and with the dropped tokens in their
context) are stale: the cache is then rebuilt from the cropped context (a full forward, as without
a cache). The results are therefore the same with and without the cache, up to float round-off.

The model passed to `generate` needs: `block_size` (int), `forward(idx (B, T), caches=None) ->
logits (B, T, V)` and `new_caches() -> list` (empty caches, one per layer).
"""

from __future__ import annotations

import torch
from torch import Tensor


def next_token_logits(logits: Tensor, temperature: float, top_k: int | None = None) -> Tensor:
    """(B, V) raw logits -> (B, V) logits whose softmax is the sampling distribution (tau > 0)."""
    if temperature <= 0:
        raise ValueError("temperature 0 is greedy decoding: use argmax, there is no distribution")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, 1) k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits of the last position -> (B, 1) next token ids."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = next_token_logits(logits, temperature, top_k).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> Tensor:
    """idx (B, T0) int64 prompt -> (B, T0 + max_new_tokens): prompt followed by the sampled tokens.

    Puts the model in eval mode for the loop (no dropout, no router noise) and restores its mode.
    """
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (B, T0) with T0 >= 1, got shape {tuple(idx.shape)}")
    block = model.block_size
    was_training = model.training
    model.eval()
    try:
        caches, fed = None, 0  # fed: how many tokens of the current window the caches hold
        for _ in range(max_new_tokens):
            window = idx[:, -block:]  # crop the context to the last block_size tokens
            if not use_cache:
                logits = model(window)
            else:
                if caches is None or idx.shape[1] > block:  # first step, or the window slid: rebuild
                    caches, fed = model.new_caches(), 0
                logits = model(window[:, fed:], caches=caches)  # only the tokens not yet cached
                fed = window.shape[1]
            nxt = sample_next(logits[:, -1], temperature, top_k, generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
    finally:
        model.train(was_training)
    return idx
