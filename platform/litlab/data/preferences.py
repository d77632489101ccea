"""Generated preference pairs whose preferred completion has a CHECKABLE property (chapter 12, DPO/RLHF).

Each example is a prompt x (prompt_len letters of `alphabet`, uniform) and two completions of the
SAME length L ~ U[min_len, max_len], drawn from one base distribution D(y | x): each letter is, with
probability copy_prob, a uniform pick among the prompt's letters, else uniform over the alphabet.
By rejection sampling, the chosen completion y_w is a draw of D(y | x, L) that HAS the property and
the rejected one y_l a draw that does NOT, so the property is the only systematic difference
between them (same prompt, same length, same letter distribution otherwise). `has_property` is the
one definition used both to build the pairs and to score sampled completions:

    no_e             no letter 'e'                       (base rate of D with the defaults: ~0.54)
    ends_with_vowel  the last letter is one of a e i o u (base rate: vowels / alphabet, 0.25)
    more_a_than_b    count('a') > count('b')             (base rate: ~0.31)

A model fitted on BOTH completions of every pair (the SFT reference of the preference chapter) sees
the property in exactly half of its training completions, so it produces it ~50% of the time.

Tokens are characters (no tokenizer): PAD = 0, BOS = 1, SEP = 2, EOS = 3, then one id per letter.
A sequence is  BOS x_1..x_P SEP y_1..y_L EOS  PAD...,  padded to block_size = P + max_len + 3 (the
prompt has a fixed length, so the prompts of a batch, ids[:, :P + 2], are sampled from in parallel).
Batches: (chosen (B, T) int64, chosen_mask (B, T) bool, rejected (B, T), rejected_mask (B, T)); the
mask is True on the completion tokens y_1..y_L EOS (what a policy is scored on), False on the
prompt and the padding. Deterministic from data.seed (independent of the run seed).
info(): vocab_size, block_size, prompt_len, min_len, max_len, alphabet, property.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from litlab.data.base import LitlabDataModule
from litlab.data.memory import Batch, FastLoaderMixin
from litlab.errors import ConfigError
from litlab.registry import register_data
from litlab.schema import Range

PAD, BOS, SEP, EOS = 0, 1, 2, 3
N_SPECIAL = 4
VOWELS = "aeiou"

PROPERTIES: dict[str, Callable[[str], bool]] = {
    "no_e": lambda s: "e" not in s,
    "ends_with_vowel": lambda s: len(s) > 0 and s[-1] in VOWELS,
    "more_a_than_b": lambda s: s.count("a") > s.count("b"),
}
Property = Literal["no_e", "ends_with_vowel", "more_a_than_b"]
DEFAULT_PROPERTY = "no_e"
MAX_TRIES = 1000  # rejection-sampling draws per completion before the property is declared impossible

Count = Annotated[int, Range(ge=1, le=10_000_000)]
Length = Annotated[int, Range(ge=1, le=200)]


def has_property(text: str, prop: str = DEFAULT_PROPERTY) -> bool:
    """Does the completion `text` have the property `prop` (a key of PROPERTIES)?"""
    return PROPERTIES[prop](text)


def encode(text: str, alphabet: str) -> list[int]:
    return [N_SPECIAL + alphabet.index(c) for c in text]


def decode_completion(ids: Sequence[int], alphabet: str) -> tuple[str, bool]:
    """Sampled completion ids (after SEP) -> (text up to the first EOS, well_formed). Well-formed:
    an EOS was produced and every token before it is a letter (no PAD/BOS/SEP)."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS:
            return "".join(out), True
        if i < N_SPECIAL:
            return "".join(out), False
        out.append(alphabet[i - N_SPECIAL])
    return "".join(out), False  # ran out of tokens before EOS


def sample_completion(prompt: str, length: int, alphabet: str, copy_prob: float, rng: random.Random) -> str:
    """One draw of the base distribution D(y | x, L)."""
    return "".join(rng.choice(prompt) if rng.random() < copy_prob else rng.choice(alphabet) for _ in range(length))


def make_pair(rng: random.Random, prop: str, alphabet: str, prompt_len: int, min_len: int, max_len: int,
              copy_prob: float) -> tuple[str, str, str]:
    """(prompt, chosen, rejected): chosen ~ D(y | x, L, property), rejected ~ D(y | x, L, not property)."""
    prompt = "".join(rng.choice(alphabet) for _ in range(prompt_len))
    length = rng.randint(min_len, max_len)
    found: dict[bool, str] = {}
    for _ in range(MAX_TRIES):
        y = sample_completion(prompt, length, alphabet, copy_prob, rng)
        found.setdefault(has_property(y, prop), y)
        if len(found) == 2:
            return prompt, found[True], found[False]
    which = "with" if True not in found else "without"
    raise ConfigError("data.property", f"no completion {which} the property {prop!r} in {MAX_TRIES} draws "
                                       f"(prompt {prompt!r}, length {length}, alphabet {alphabet!r}): the property "
                                       "must be possible and not certain under this alphabet and these lengths")


def generate_pairs(n: int, prop: str, alphabet: str, prompt_len: int, min_len: int, max_len: int,
                   copy_prob: float, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    return [make_pair(rng, prop, alphabet, prompt_len, min_len, max_len, copy_prob) for _ in range(n)]


def encode_sequences(prompts: Sequence[str], completions: Sequence[str], alphabet: str,
                     block_size: int) -> tuple[Tensor, Tensor]:
    """-> ids (N, block_size) int64 BOS x SEP y EOS PAD..., mask (N, block_size) bool on y and EOS."""
    ids = torch.full((len(prompts), block_size), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), block_size, dtype=torch.bool)
    for i, (x, y) in enumerate(zip(prompts, completions)):
        seq = [BOS, *encode(x, alphabet), SEP, *encode(y, alphabet), EOS]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, len(x) + 2: len(seq)] = True
    return ids, mask


class PreferencePairs(Dataset):
    """A split as tensors; `__getitems__` gathers a whole batch (chosen, chosen_mask, rejected, rejected_mask)."""

    def __init__(self, pairs: list[tuple[str, str, str]], alphabet: str, block_size: int):
        self.pairs = pairs
        prompts = [p for p, _, _ in pairs]
        self.chosen, self.chosen_mask = encode_sequences(prompts, [c for _, c, _ in pairs], alphabet, block_size)
        self.rejected, self.rejected_mask = encode_sequences(prompts, [r for _, _, r in pairs], alphabet, block_size)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Batch((self.chosen[idx], self.chosen_mask[idx], self.rejected[idx], self.rejected_mask[idx]))

    def __getitem__(self, index: int):
        return tuple(t[0] for t in self.__getitems__([index]))


@register_data("preferences", description="Generated preference pairs (prompt, chosen, rejected) of letter strings; "
               "the chosen completion has a checkable property (no 'e', ends with a vowel, more a than b)")
class PreferenceDataModule(FastLoaderMixin, LitlabDataModule):
    def __init__(
        self,
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 64,
        num_workers: Annotated[int, Range(ge=0, le=256)] = 0,
        property: Property = DEFAULT_PROPERTY,  # what makes a completion preferred (see PROPERTIES)
        alphabet: str = "abcdefgh",  # the letters of prompts and completions
        prompt_len: Length = 4,  # P: every prompt has exactly P letters
        min_len: Length = 3,  # completion length range (both completions of a pair have the same length)
        max_len: Length = 8,
        copy_prob: Annotated[float, Range(ge=0, le=1)] = 0.5,  # a completion letter copies a prompt letter
        n_train: Count = 4000,
        n_val: Count = 500,
        n_test: Count = 500,
        seed: Annotated[int, Range(ge=0, lt=2**32)] = 0,  # generates the data; independent of the run seed
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if not alphabet or len(set(alphabet)) != len(alphabet):
            raise ConfigError("data.alphabet", f"needs distinct letters, got {alphabet!r}")
        if min_len > max_len:
            raise ConfigError("data.min_len", f"must be <= data.max_len, got {min_len} > {max_len}")
        self.property, self.alphabet, self.prompt_len = property, alphabet, prompt_len
        self.min_len, self.max_len, self.copy_prob = min_len, max_len, copy_prob
        self.n_train, self.n_val, self.n_test, self.seed = n_train, n_val, n_test, seed

    @property
    def block_size(self) -> int:
        return self.prompt_len + self.max_len + 3  # BOS, SEP, EOS

    def info(self) -> dict[str, Any]:
        return {"vocab_size": N_SPECIAL + len(self.alphabet), "block_size": self.block_size,
                "prompt_len": self.prompt_len, "min_len": self.min_len, "max_len": self.max_len,
                "alphabet": self.alphabet, "property": self.property}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        n = self.n_train + self.n_val + self.n_test
        pairs = generate_pairs(n, self.property, self.alphabet, self.prompt_len, self.min_len, self.max_len,
                               self.copy_prob, self.seed)
        a, b = self.n_train, self.n_train + self.n_val
        self.train_set = PreferencePairs(pairs[:a], self.alphabet, self.block_size)
        self.val_set = PreferencePairs(pairs[a:b], self.alphabet, self.block_size)
        self.test_set = PreferencePairs(pairs[b:], self.alphabet, self.block_size)
