"""Synthetic sequence tasks for recurrent networks, generated in memory from a seed.

recall (a long-range memory task): the first token is one of `num_symbols` symbols, then come
`seq_len` tokens of noise drawn uniformly from `num_noise` other tokens; the target is the first
token. An RNN reads the whole sequence and must classify from its LAST state, so the information
has to survive `seq_len` steps: the gradient that teaches the network to store it flows back from
t = seq_len to t = 0 through seq_len Jacobians dh_t/dh_{t-1} (vanishing for a vanilla RNN).
Chance accuracy: 1 / num_symbols.

Token ids: symbols 0..num_symbols-1, noise num_symbols..num_symbols+num_noise-1 (vocab_size in all).
Items: `(tokens int64 (seq_len + 1,), target int64 ())`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch

from litlab.data.base import LitlabDataModule
from litlab.data.memory import FastLoaderMixin, TensorBatchDataset
from litlab.registry import register_data
from litlab.schema import Range

Count = Annotated[int, Range(ge=1, le=100_000_000)]


def recall_examples(n: int, seq_len: int, num_symbols: int, num_noise: int, generator: torch.Generator,
                    noise: str = "distinct") -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences (n, seq_len + 1) int64 and their targets (n,) int64 (the first token)."""
    first = torch.randint(0, num_symbols, (n,), generator=generator)  # (n,)
    low, high = (0, num_symbols) if noise == "symbols" else (num_symbols, num_symbols + num_noise)
    noise = torch.randint(low, high, (n, seq_len), generator=generator)  # (n, T)
    return torch.cat([first[:, None], noise], dim=1), first


@register_data("recall", description="long-range memory: recall the first token after seq_len steps of noise "
               "(sequence classification, synthetic)")
class RecallDataModule(FastLoaderMixin, LitlabDataModule):
    def __init__(
        self,
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 64,
        num_workers: Annotated[int, Range(ge=0, le=256)] = 0,
        seq_len: Annotated[int, Range(ge=1, le=100_000)] = 20,  # T: noise steps after the symbol
        num_symbols: Annotated[int, Range(ge=2, le=10_000)] = 8,  # classes; chance = 1 / num_symbols
        noise: Literal["distinct", "symbols"] = "distinct",  # noise tokens of their own, or the symbols again
        num_noise: Annotated[int, Range(ge=1, le=10_000)] = 4,  # distinct noise tokens (noise=distinct)
        n_train: Count = 4096,
        n_val: Count = 512,
        n_test: Count = 1024,
        seed: Annotated[int, Range(ge=0, lt=2**32)] = 0,  # generates the data; independent of the run seed
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.seq_len, self.num_symbols, self.noise = seq_len, num_symbols, noise
        self.num_noise = num_noise if noise == "distinct" else 0
        self.n_train, self.n_val, self.n_test, self.seed = n_train, n_val, n_test, seed

    def info(self) -> dict[str, Any]:
        return {"vocab_size": self.num_symbols + self.num_noise, "num_classes": self.num_symbols}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        g = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set, self.test_set = (
            TensorBatchDataset(*recall_examples(n, self.seq_len, self.num_symbols, self.num_noise, g, self.noise))
            for n in (self.n_train, self.n_val, self.n_test))
