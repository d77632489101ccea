"""Character-level language-modelling data: one long text, split contiguously, cut into windows.

`source` is one of
  - "pydoc" (default): the English text Python ships for `help()` (`pydoc_data.topics.topics`, a
    dict of ~465 KB: its values joined by blank lines), so it works offline, with no download;
  - a local text file (UTF-8): any path that exists, or one that starts with / . ~ or ends in .txt;
  - a Hugging Face data set name (`load_dataset(source)`, downloaded into the HF cache on first use)
    or a local directory that `load_dataset` reads (parquet, csv, json or txt files): split
    `hf_split`, column `text_column`, rows joined by newlines.

The text (its first `max_chars` characters if set) is split CONTIGUOUSLY: the first
1 - val_fraction - test_fraction for training, then validation, then test, so no window of val/test
text was seen in training. With `level: char` (default) the vocabulary is the set of characters of
the TRAIN split; id 0 stands for any other character (decoded as U+FFFD). With `level: byte` each
split is encoded as UTF-8 and the tokens are its bytes (vocabulary 256, nothing is ever unknown, no
tokenizer to fit or download; a non-ASCII character costs 2-4 tokens). Each split is cut into
non-overlapping windows of `seq_len` tokens with next-token targets: x = ids[i : i+T],
y = ids[i+1 : i+T+1].

Items: `(x int64 (seq_len,), y int64 (seq_len,))`. info(): {"vocab_size": len(vocab)}.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from torch import Tensor

from litlab.data.base import LitlabDataModule
from litlab.data.memory import FastLoaderMixin, TensorBatchDataset
from litlab.errors import ConfigError, UserError
from litlab.registry import register_data
from litlab.schema import Range

UNKNOWN = "\ufffd"  # how id 0 (a character outside the training vocabulary) decodes


class CharVocab:
    """id 0 = unknown character, ids 1..V-1 = `chars` (sorted)."""

    def __init__(self, chars: str | Sequence[str]):
        self.chars = "".join(chars)
        self.itos = [UNKNOWN, *self.chars]
        self._table = np.zeros(max((ord(c) for c in self.chars), default=0) + 1, dtype=np.int64)
        self._table[[ord(c) for c in self.chars]] = np.arange(1, len(self.chars) + 1)

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> Tensor:
        """str -> int64 (len(text),); vectorised through a code point -> id table."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.zeros(len(codes), dtype=np.int64)
        known = codes < len(self._table)
        ids[known] = self._table[codes[known]]
        return torch.from_numpy(ids)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        return "".join(self.itos[int(i)] for i in ids)


class ByteVocab:
    """Byte-level tokens: id = one byte of the UTF-8 encoding (0..255); same interface as CharVocab."""

    itos = tuple(bytes([i]) for i in range(256))

    def __len__(self) -> int:
        return 256

    def encode(self, text: str) -> Tensor:
        """str -> int64 (number of UTF-8 bytes,)."""
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """Invalid UTF-8 (e.g. a sampled stray continuation byte) decodes as U+FFFD."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def pydoc_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def windows(ids: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """(N,) ids -> x, y (n, seq_len) with y the next character of x, n = (N - 1) // seq_len."""
    n = (len(ids) - 1) // seq_len
    return ids[: n * seq_len].view(n, seq_len), ids[1: n * seq_len + 1].view(n, seq_len)


@register_data("text_chars", description="character- or byte-level language modelling on one text: Python's offline "
               "pydoc corpus (default), a local text file or a Hugging Face text data set")
class TextCharsDataModule(FastLoaderMixin, LitlabDataModule):
    def __init__(
        self,
        batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 64,
        num_workers: Annotated[int, Range(ge=0, le=256)] = 0,
        source: str = "pydoc",  # "pydoc", a local text file, or a Hugging Face data set name
        text_column: str = "text",  # Hugging Face source only
        hf_split: str = "train",  # Hugging Face source only
        max_chars: Annotated[int, Range(ge=100, le=10**11)] | None = None,  # use only the first max_chars
        seq_len: Annotated[int, Range(ge=1, le=100_000)] = 128,  # T: characters per window (BPTT length)
        val_fraction: Annotated[float, Range(ge=0.001, le=0.5)] = 0.05,
        test_fraction: Annotated[float, Range(ge=0.001, le=0.5)] = 0.05,
        level: Literal["char", "byte"] = "char",  # tokens: characters (train-split vocabulary) or UTF-8 bytes
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if not source:
            raise ConfigError("data.source", "is empty: use 'pydoc', a text file path or a Hugging Face data set name")
        self.source, self.text_column, self.hf_split = source, text_column, hf_split
        self.max_chars, self.seq_len = max_chars, seq_len
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.level = level
        self.texts: dict[str, str] | None = None  # train / val / test text, after _load()
        self.vocab: CharVocab | ByteVocab | None = None

    # ------------------------------------------------------------ loading (info() needs the vocabulary)
    def _read_source(self) -> str:
        if self.source == "pydoc":
            return pydoc_corpus()
        p = Path(self.source).expanduser()
        looks_local = self.source.startswith(("/", ".", "~")) or self.source.endswith(".txt")
        if p.is_file():
            try:
                return p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"data.source: cannot read {self.source} as UTF-8 text: {e}") from None
        if looks_local and not p.is_dir():
            raise UserError(f"data.source: {self.source}: not an existing text file or directory")
        return self._read_hf()  # a Hub name, or a local data set directory (parquet, csv, json, txt files)

    def _read_hf(self) -> str:
        import datasets

        try:
            ds = datasets.load_dataset(self.source, split=self.hf_split)
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"data.source: cannot load {self.source!r} (split {self.hf_split!r}) as a local file "
                            f"or a Hugging Face data set: {msg}") from e
        if self.text_column not in ds.column_names:
            raise ConfigError("data.text_column", f"no column {self.text_column!r} in {self.source}; columns: "
                              f"{', '.join(ds.column_names)}")
        return "\n".join(t for t in ds[self.text_column] if t)

    def _load(self) -> None:
        if self.texts is not None:
            return
        text = self._read_source()
        if self.max_chars is not None:
            text = text[: self.max_chars]
        if self.val_fraction + self.test_fraction > 0.9:
            raise ConfigError("data.val_fraction", "val_fraction + test_fraction must be <= 0.9")
        n = len(text)
        n_val, n_test = int(n * self.val_fraction), int(n * self.test_fraction)
        n_train = n - n_val - n_test
        self.texts = {"train": text[:n_train], "val": text[n_train:n_train + n_val], "test": text[n_train + n_val:]}
        for name, part in self.texts.items():
            if len(part) < self.seq_len + 1:
                raise ConfigError("data.seq_len", f"{self.seq_len} is too long: the {name} split has only "
                                  f"{len(part)} characters ({n} in all); lower seq_len or use more text")
        self.vocab = CharVocab.from_text(self.texts["train"]) if self.level == "char" else ByteVocab()

    def info(self) -> dict[str, Any]:
        self._load()
        return {"vocab_size": len(self.vocab)}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._load()
        sets = [TensorBatchDataset(*windows(self.vocab.encode(self.texts[s]), self.seq_len))
                for s in ("train", "val", "test")]
        self.train_set, self.val_set, self.test_set = sets
