"""Plain nn.Modules and sampling for the preference chapter (no Lightning).

RewardModel: r(x, y) = w^T LN_f(h_L)[EOS] + b, a causal GPT trunk (nets.GPT without its LM head)
read at the completion's last token (EOS), which under causal attention has seen the whole of
(x, y); padding after EOS cannot leak in.

sample_completions / score_completions: draw completions of the prompts from a policy with a
fixed-seed generator and check them with the data's `has_property`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from litlab.chapters.gpt.nets import GPT
from litlab.chapters.preference.losses import completion_mask_after
from litlab.data.preferences import EOS, decode_completion, has_property


class RewardModel(nn.Module):
    """ids (B, T), mask (B, T) True on the completion tokens -> rewards (B,)."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, d_model: int,
                 d_ff: int | None = None, dropout: float = 0.0, positional: str = "rope"):
        super().__init__()
        self.trunk = GPT(vocab_size, block_size, n_layer, n_head, d_model, d_ff, dropout, positional,
                         tie_weights=False)
        self.trunk.lm_head = nn.Identity()  # the trunk now returns LN_f(h_L) (B, T, D), not logits
        self.head = nn.Linear(d_model, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self.trunk(ids)  # (B, T, D)
        positions = torch.arange(ids.shape[1], device=ids.device)
        last = (mask * positions).argmax(dim=1)  # (B,) index of the last completion token (EOS)
        return self.head(h[torch.arange(len(ids), device=ids.device), last]).squeeze(-1)  # (B,)


@dataclass
class Scored:
    ids: Tensor  # (N, T) prompt + sampled tokens
    mask: Tensor  # (N, T) bool: the sampled completion up to and including its first EOS
    texts: list[str]
    valid: Tensor  # (N,) bool: ended with EOS, letters only, min_len <= length <= max_len
    has: Tensor  # (N,) bool: valid AND has_property


@torch.no_grad()
def sample_completions(net: GPT, prompts: Tensor, max_new_tokens: int, temperature: float,
                       generator: torch.Generator | None) -> Tensor:
    """prompts (N, P + 2) = BOS x SEP -> (N, P + 2 + max_new_tokens) (KV-cache decoding, eval mode)."""
    return net.generate(prompts, max_new_tokens, temperature=temperature, generator=generator)


def score_completions(ids: Tensor, prompt_tokens: int, alphabet: str, prop: str, min_len: int,
                      max_len: int) -> Scored:
    """Decode the completions of sampled `ids` (after the first `prompt_tokens` tokens) and check them."""
    texts, valid, has = [], [], []
    for row in ids[:, prompt_tokens:].tolist():
        text, well_formed = decode_completion(row, alphabet)
        ok = well_formed and min_len <= len(text) <= max_len
        texts.append(text)
        valid.append(ok)
        has.append(ok and has_property(text, prop))
    mask = completion_mask_after(ids, prompt_tokens, EOS)
    valid_t = torch.tensor(valid, dtype=torch.bool, device=ids.device)
    has_t = torch.tensor(has, dtype=torch.bool, device=ids.device)
    return Scored(ids, mask, texts, valid_t, has_t)
