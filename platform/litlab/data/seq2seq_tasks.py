"""Generated sequence-to-sequence tasks for the encoder-decoder chapter: reverse or sort a digit
string, or convert a date written by a human ("april 5, 2023", "5 apr 2023", "05/04/2023") to ISO
("2023-04-05"). Deterministic from `seed` (independent of the run seed); every source string is
distinct across train, val and test, so val/test never repeat a training example.

Vocabulary (`Vocab`, character level): PAD = 0, BOS = 1, EOS = 2, then the task's characters
(digits for reverse/sort; digits, lowercase letters and " ,/-." for date). One vocabulary is shared
by source and target.

Batches are `(src, src_len, tgt_in, tgt_out)`, padded with PAD to the longest item OF THE BATCH:
    src      int64 (B, S)  source tokens, no BOS/EOS
    src_len  int64 (B,)    true source lengths (>= 1); src[b, src_len[b]:] == PAD
    tgt_in   int64 (B, T)  BOS y_1 ... y_n  PAD...   decoder input (teacher forcing)
    tgt_out  int64 (B, T)  y_1 ... y_n EOS  PAD...   what the decoder must predict at each step
`tgt_in` is `tgt_out` shifted right by one with BOS in front, so T = longest target + 1.
`info()` gives the model `vocab_size` and `max_target_len` (longest possible target + EOS: the
greedy decoder's step limit).
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from litlab.data.base import LitlabDataModule
from litlab.data.memory import Batch, FastLoaderMixin
from litlab.errors import ConfigError
from litlab.registry import register_data
from litlab.schema import Range

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")
DIGITS = "0123456789"
DATE_CHARS = DIGITS + "abcdefghijklmnopqrstuvwxyz ,/-."

Count = Annotated[int, Range(ge=1, le=10_000_000)]
Length = Annotated[int, Range(ge=1, le=1000)]
Seed = Annotated[int, Range(ge=0, lt=2**32)]

_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
           "october", "november", "december"]
_WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]  # fixed, not the locale's
_FIRST_DAY, _LAST_DAY = dt.date(1950, 1, 1).toordinal(), dt.date(2049, 12, 31).toordinal()
# Human-readable source formats of the date task; the target is always ISO 8601 (YYYY-MM-DD).
DATE_FORMATS = (
    lambda d: f"{d.day} {_MONTHS[d.month - 1][:3]} {d.year}",  # 5 apr 2023
    lambda d: f"{_MONTHS[d.month - 1]} {d.day}, {d.year}",  # april 5, 2023
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year}",  # 05/04/2023 (day first)
    lambda d: f"{d.day}.{d.month}.{d.year}",  # 5.4.2023
    lambda d: f"{_WEEKDAYS[d.weekday()]} {d.day} {_MONTHS[d.month - 1]} {d.year}",  # wed 5 april 2023
)


class Vocab:
    """Character vocabulary: ids 0, 1, 2 are PAD, BOS, EOS; then one id per character."""

    def __init__(self, chars: str):
        self.itos = list(SPECIALS) + list(chars)
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Characters up to the first EOS; PAD and BOS are skipped."""
        out = []
        for i in (ids.tolist() if isinstance(ids, Tensor) else ids):
            if i == EOS:
                break
            if i > EOS:
                out.append(self.itos[i])
        return "".join(out)

    def tokens(self, ids: Sequence[int] | Tensor) -> list[str]:
        """One display label per id (for attention plots): specials as <eos> etc."""
        return [self.itos[i] for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]


def make_example(task: str, rng: random.Random, min_len: int, max_len: int) -> tuple[str, str]:
    """One (source, target) pair of strings."""
    if task == "date":
        d = dt.date.fromordinal(rng.randint(_FIRST_DAY, _LAST_DAY))
        return rng.choice(DATE_FORMATS)(d), d.isoformat()
    n = rng.randint(min_len, max_len)
    src = "".join(rng.choice(DIGITS) for _ in range(n))
    return src, (src[::-1] if task == "reverse" else "".join(sorted(src)))


def space_size(task: str, min_len: int, max_len: int) -> int:
    """How many distinct source strings the task can generate."""
    if task == "date":
        return (_LAST_DAY - _FIRST_DAY + 1) * len(DATE_FORMATS)
    return sum(10**n for n in range(min_len, max_len + 1))


def generate(task: str, n: int, min_len: int, max_len: int, seed: int) -> list[tuple[str, str]]:
    """`n` pairs with distinct sources, deterministic in (task, lengths, seed). The length is drawn
    uniformly in [min_len, max_len], then the digits (so short strings are as common as long ones)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        src, tgt = make_example(task, rng, min_len, max_len)
        if src not in seen:
            seen.add(src)
            out.append((src, tgt))
    return out


class Seq2SeqDataset(Dataset):
    """A split as padded tensors; `__getitems__` gathers a batch and trims it to its longest item."""

    def __init__(self, pairs: list[tuple[str, str]], vocab: Vocab):
        self.pairs = pairs
        n = len(pairs)
        src_ids = [vocab.encode(s) for s, _ in pairs]
        tgt_ids = [vocab.encode(t) for _, t in pairs]
        s_max = max(map(len, src_ids))
        t_max = max(map(len, tgt_ids)) + 1
        self.src = torch.full((n, s_max), PAD, dtype=torch.long)  # (N, S_max)
        self.tgt_in = torch.full((n, t_max), PAD, dtype=torch.long)  # (N, T_max)
        self.tgt_out = torch.full((n, t_max), PAD, dtype=torch.long)
        for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
            self.src[i, : len(s)] = torch.tensor(s)
            self.tgt_in[i, : len(t) + 1] = torch.tensor([BOS, *t])
            self.tgt_out[i, : len(t) + 1] = torch.tensor([*t, EOS])
        self.src_len = torch.tensor([len(s) for s in src_ids], dtype=torch.long)  # (N,)
        self.tgt_len = torch.tensor([len(t) + 1 for t in tgt_ids], dtype=torch.long)  # incl. EOS

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        s, t = int(self.src_len[idx].max()), int(self.tgt_len[idx].max())
        return Batch((self.src[idx, :s], self.src_len[idx], self.tgt_in[idx, :t], self.tgt_out[idx, :t]))

    def __getitem__(self, index: int):
        return tuple(x[0] for x in self.__getitems__([index]))


@register_data("seq2seq_task", description="Generated seq2seq tasks (reverse or sort a digit string, date to ISO); "
               "padded (src, src_len, tgt_in, tgt_out) batches")
class Seq2SeqTaskDataModule(FastLoaderMixin, LitlabDataModule):
    def __init__(
        self,
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 64,
        num_workers: Annotated[int, Range(ge=0, le=256)] = 0,
        task: Literal["reverse", "sort", "date"] = "reverse",
        min_len: Length = 3,  # source length range, digit tasks (reverse, sort) only
        max_len: Length = 8,
        n_train: Count = 5000,
        n_val: Count = 500,
        n_test: Count = 500,
        seed: Seed = 0,  # generates the data; independent of the run seed
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if min_len > max_len:
            raise ConfigError("data.min_len", f"must be <= data.max_len, got min_len={min_len}, max_len={max_len}")
        total, space = n_train + n_val + n_test, space_size(task, min_len, max_len)
        if total > space // 2:  # distinct sources by rejection: keep the space at least half empty
            raise ConfigError("data.n_train", f"n_train + n_val + n_test = {total} distinct examples, but task={task!r} "
                              f"with lengths {min_len}-{max_len} has only {space} possible sources: "
                              "ask for at most half of them (fewer examples or longer sequences)")
        self.task, self.min_len, self.max_len, self.seed = task, min_len, max_len, seed
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.vocab = Vocab(DATE_CHARS if task == "date" else DIGITS)

    def max_target_len(self) -> int:
        """The longest target any example can have, + 1 for EOS."""
        return (len("yyyy-mm-dd") if self.task == "date" else self.max_len) + 1

    def info(self) -> dict[str, Any]:
        return {"vocab_size": len(self.vocab), "max_target_len": self.max_target_len()}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        pairs = generate(self.task, self.n_train + self.n_val + self.n_test, self.min_len, self.max_len, self.seed)
        a, b = self.n_train, self.n_train + self.n_val
        self.train_set = Seq2SeqDataset(pairs[:a], self.vocab)
        self.val_set = Seq2SeqDataset(pairs[a:b], self.vocab)
        self.test_set = Seq2SeqDataset(pairs[b:], self.vocab)
