"""Tasks on the pydoc passage corpus (corpus.py): BERT pretraining, a labelled classification task,
retrieval (inverse cloze) and retrieval-augmented generation. All share corpus.py's passage split
and vocabulary, so checkpoints move between them (the models check `vocab_signature`).

- `pydoc_mlm`: [CLS] A [SEP] B [SEP] rows (A, B: the halves of a passage; with nsp, B is the B of a
  passage of another topic for a random half of the rows). Batches (input_ids, segment_ids,
  mlm_labels, nsp_labels), each (B, T) except nsp_labels (B,). Training rows are re-masked every
  batch (dynamic masking); val/test rows are masked once, with a fixed seed. A row has at most
  `max_predictions` = round(mask_prob * passage_tokens) selected positions (info() tells the model).
- `pydoc_sections`: [CLS] passage [SEP] -> which part of the Python documentation the passage's
  topic comes from (7 classes, corpus.DOC_SECTIONS). `n_train` keeps only that many labelled
  training passages (the low-label regime where pretraining pays).
- `pydoc_retrieval`: inverse cloze task (Lee et al. 2019): query = one sentence of a passage,
  target = the passage WITHOUT that sentence (with probability keep_query_prob it is kept in
  training, so lexical overlap is also learnt). Train batches (query_ids, context_ids, source: the
  passage index, so that two queries of one passage are not each other's negatives); val/test
  batches (query_ids, gold) where gold indexes `index_ids`, ALL the corpus's passages (val/test
  passages stored without their query sentence).
- `pydoc_rag`: query = `query_tokens` consecutive tokens of a passage, answer = its first
  `answer_tokens` tokens (answer="start"; the span never overlaps them) or the tokens right after
  the span ("continuation"); the knowledge store `index_ids` is every passage in full. Training
  spans are drawn afresh for every batch (each passage `queries_per_passage` times per epoch).
  Batches (query (B, Q), answer (B, A), gold (B,) index rows, passage (B, W) = index_ids[gold]).
  The answers of val/test queries come from
  passages no model was trained on, so only a retrieved passage can supply them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from litlab.data.base import LitlabDataModule
from litlab.data.corpus import (CLS, SECTION_NAMES, SEP, Corpus, load_corpus, mask_tokens, mlm_predictions,
                                pad_rows, sentence_pairs)
from litlab.data.memory import Batch, FastLoaderMixin
from litlab.errors import ConfigError
from litlab.registry import register_data
from litlab.schema import Range

Fraction = Annotated[float, Range(ge=0.01, le=0.4)]
PassageTokens = Annotated[int, Range(ge=8, le=512)]
Count = Annotated[int, Range(ge=1, le=10**7)] | None


class TensorTupleDataset(Dataset):
    """Rows of several aligned tensors; `__getitems__` gathers a whole batch at once (memory.py)
    and applies `transform(tuple) -> tuple` to it (e.g. dynamic masking)."""

    def __init__(self, *tensors: Tensor, transform=None):
        if len({len(t) for t in tensors}) != 1:
            raise ValueError(f"tensors of different lengths: {[len(t) for t in tensors]}")
        self.tensors, self.transform = tensors, transform

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitems__(self, indices) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        rows = tuple(t[idx] for t in self.tensors)
        return Batch(self.transform(rows) if self.transform is not None else rows)

    def __getitem__(self, index: int):
        return tuple(t[0] for t in self.__getitems__([index]))


class CorpusDataModule(FastLoaderMixin, LitlabDataModule):
    """Shared arguments: the passage split and vocabulary (corpus.load_corpus)."""

    def __init__(self, batch_size: int = 32, num_workers: int = 0, passage_tokens: int = 64,
                 vocab_size: int | None = None, min_freq: int = 1, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, split_seed: int = 0, n_train: int | None = None):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.passage_tokens, self.vocab_size, self.min_freq = passage_tokens, vocab_size, min_freq
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.n_train = n_train

    @property
    def corpus(self) -> Corpus:
        return load_corpus(self.passage_tokens, self.val_fraction, self.test_fraction, self.split_seed,
                           self.vocab_size, self.min_freq)

    def indices(self, split: str) -> np.ndarray:
        idx = self.corpus.split[split]
        if split == "train" and self.n_train is not None:  # a seeded subset, in corpus order
            rng = np.random.default_rng(self.split_seed + 1)
            idx = np.sort(rng.permutation(idx)[: self.n_train])
        return idx

    def rng(self, split: str) -> np.random.Generator:
        return np.random.default_rng([self.split_seed, ("train", "val", "test").index(split)])

    def info(self) -> dict[str, Any]:
        vocab = self.corpus.vocab
        return {"vocab_size": len(vocab), "max_len": self.passage_tokens + 3, "vocab_signature": vocab.signature}

    def wrap(self, ids: list[int]) -> list[int]:
        return [CLS, *ids[: self.passage_tokens], SEP]


@register_data("pydoc_mlm", description="BERT pretraining on the pydoc passages: masked tokens (15%: 80/10/10) "
               "and optional next-sentence pairs (50% true / 50% random)")
class PydocMLMDataModule(CorpusDataModule):
    def __init__(self, batch_size: Annotated[int, Range(ge=1, le=100_000)] = 32,
                 num_workers: Annotated[int, Range(ge=0, le=256)] = 0, passage_tokens: PassageTokens = 64,
                 vocab_size: Annotated[int, Range(ge=16, le=10**6)] | None = None,
                 min_freq: Annotated[int, Range(ge=1)] = 1, val_fraction: Fraction = 0.1,
                 test_fraction: Fraction = 0.1, split_seed: Annotated[int, Range(ge=0)] = 0, n_train: Count = None,
                 nsp: bool = True,  # next-sentence pairs: B is a random other passage's half half the time
                 mask_prob: Annotated[float, Range(gt=0, lt=1)] = 0.15):
        super().__init__(batch_size, num_workers, passage_tokens, vocab_size, min_freq, val_fraction, test_fraction,
                         split_seed, n_train)
        self.nsp, self.mask_prob = nsp, mask_prob

    @property
    def max_predictions(self) -> int:
        """Selected positions per row, at most (a row holds <= passage_tokens non-special tokens)."""
        return mlm_predictions(self.passage_tokens, self.mask_prob)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "nsp": self.nsp, "max_predictions": self.max_predictions}

    def _mask(self, rows: tuple[Tensor, ...], generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        ids, segments, is_next = rows
        inputs, labels = mask_tokens(ids, len(self.corpus.vocab), self.mask_prob, generator,
                                     max_predictions=self.max_predictions)
        return inputs, segments, labels, is_next

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        sets = {}
        for split in ("train", "val", "test"):
            rows = sentence_pairs(self.corpus, self.indices(split), self.rng(split), self.nsp, self.passage_tokens)
            if split == "train":
                sets[split] = TensorTupleDataset(*rows, transform=self._mask)
            else:  # fixed masks: the same positions are scored at every validation
                g = torch.Generator().manual_seed(self.split_seed * 10 + (1 if split == "val" else 2))
                sets[split] = TensorTupleDataset(*self._mask(rows, g))
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]


@register_data("pydoc_sections", description="classify a pydoc passage by the part of the Python docs it comes "
               "from (7 classes: simple/compound statements, expressions, lexical, data model, execution, library)")
class PydocSectionsDataModule(CorpusDataModule):
    def __init__(self, batch_size: Annotated[int, Range(ge=1, le=100_000)] = 32,
                 num_workers: Annotated[int, Range(ge=0, le=256)] = 0, passage_tokens: PassageTokens = 64,
                 vocab_size: Annotated[int, Range(ge=16, le=10**6)] | None = None,
                 min_freq: Annotated[int, Range(ge=1)] = 1, val_fraction: Fraction = 0.1,
                 test_fraction: Fraction = 0.1, split_seed: Annotated[int, Range(ge=0)] = 0,
                 n_train: Count = None):  # labelled training passages kept (None: all ~1230)
        super().__init__(batch_size, num_workers, passage_tokens, vocab_size, min_freq, val_fraction, test_fraction,
                         split_seed, n_train)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "num_classes": len(SECTION_NAMES)}

    def split_tensors(self, split: str) -> tuple[Tensor, Tensor]:
        c = self.corpus
        idx = self.indices(split)
        ids = pad_rows([self.wrap(c.vocab.encode(c.passages[i].tokens)) for i in idx], self.passage_tokens + 2)
        return ids, torch.tensor([c.passages[i].section for i in idx], dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = (TensorTupleDataset(*self.split_tensors(s))
                                                           for s in ("train", "val", "test"))


class IndexedCorpusDataModule(CorpusDataModule):
    """A corpus task whose val/test targets are rows of `index_ids` (N, passage_tokens + 2)."""

    index_ids: Tensor | None = None

    def index(self) -> Tensor:
        self.setup()
        return self.index_ids


def _ict_example(sentences: list[list[int]], j: int, keep: bool) -> tuple[list[int], list[int]]:
    """Inverse cloze: (sentence j, the passage without it -- or with it when keep)."""
    rest = [t for k, s in enumerate(sentences) if keep or k != j for t in s]
    return sentences[j], rest


@register_data("pydoc_retrieval", description="inverse cloze retrieval on the pydoc passages: a sentence -> "
               "the passage it was taken from (recall@k over all ~1500 passages)")
class PydocRetrievalDataModule(IndexedCorpusDataModule):
    def __init__(self, batch_size: Annotated[int, Range(ge=2, le=100_000)] = 64,
                 num_workers: Annotated[int, Range(ge=0, le=256)] = 0, passage_tokens: PassageTokens = 64,
                 vocab_size: Annotated[int, Range(ge=16, le=10**6)] | None = None,
                 min_freq: Annotated[int, Range(ge=1)] = 1, val_fraction: Fraction = 0.1,
                 test_fraction: Fraction = 0.1, split_seed: Annotated[int, Range(ge=0)] = 0, n_train: Count = None,
                 query_tokens: Annotated[int, Range(ge=2, le=512)] = 24,  # a query sentence is cut to this
                 min_query_tokens: Annotated[int, Range(ge=1, le=512)] = 4,  # shorter sentences are no queries
                 keep_query_prob: Annotated[float, Range(ge=0, le=1)] = 0.1):  # train: query left in its passage
        super().__init__(batch_size, num_workers, passage_tokens, vocab_size, min_freq, val_fraction, test_fraction,
                         split_seed, n_train)
        if min_query_tokens > query_tokens:
            raise ConfigError("data.min_query_tokens", f"{min_query_tokens} > query_tokens={query_tokens}")
        self.query_tokens, self.min_query_tokens, self.keep_query_prob = query_tokens, min_query_tokens, keep_query_prob

    def _queries(self, i: int) -> list[int]:
        return [j for j, s in enumerate(self.corpus.ids(i)) if len(s) >= self.min_query_tokens]

    def _wrap_query(self, q: list[int]) -> list[int]:
        return [CLS, *q[: self.query_tokens], SEP]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        c, width = self.corpus, self.passage_tokens + 2
        index = [self.wrap([t for s in c.ids(i) for t in s]) for i in range(len(c.passages))]
        evals = {}
        for split in ("val", "test"):  # one query per passage with >= 2 sentences
            rng, queries, gold = self.rng(split), [], []
            for i in self.indices(split):
                sentences, choices = c.ids(i), self._queries(i)
                if len(sentences) < 2 or not choices:
                    continue
                query, rest = _ict_example(sentences, int(rng.choice(choices)), keep=False)
                index[i] = self.wrap(rest)
                queries.append(self._wrap_query(query))
                gold.append(int(i))
            evals[split] = TensorTupleDataset(pad_rows(queries, self.query_tokens + 2), torch.tensor(gold))
        rng, queries, contexts, sources = self.rng("train"), [], [], []
        for i in self.indices("train"):  # every usable sentence of every training passage is a query
            sentences = c.ids(i)
            if len(sentences) < 2:
                continue
            for j in self._queries(i):
                query, rest = _ict_example(sentences, j, keep=rng.random() < self.keep_query_prob)
                queries.append(self._wrap_query(query))
                contexts.append(self.wrap(rest))
                sources.append(int(i))
        if len(queries) < 2:
            raise ConfigError("data.n_train", "too few training passages with two sentences for in-batch negatives")
        self.train_set = TensorTupleDataset(pad_rows(queries, self.query_tokens + 2), pad_rows(contexts, width),
                                            torch.tensor(sources))
        self.val_set, self.test_set = evals["val"], evals["test"]
        self.index_ids = pad_rows(index, width)


@register_data("pydoc_rag", description="retrieval-augmented generation on the pydoc passages: given a span of "
               "a passage, generate its first tokens (or the tokens after the span); needs its passage retrieved")
class PydocRAGDataModule(IndexedCorpusDataModule):
    def __init__(self, batch_size: Annotated[int, Range(ge=2, le=100_000)] = 32,
                 num_workers: Annotated[int, Range(ge=0, le=256)] = 0, passage_tokens: PassageTokens = 64,
                 vocab_size: Annotated[int, Range(ge=16, le=10**6)] | None = None,
                 min_freq: Annotated[int, Range(ge=1)] = 1, val_fraction: Fraction = 0.1,
                 test_fraction: Fraction = 0.1, split_seed: Annotated[int, Range(ge=0)] = 0, n_train: Count = None,
                 query_tokens: Annotated[int, Range(ge=1, le=256)] = 8,  # Q: the span given
                 answer_tokens: Annotated[int, Range(ge=1, le=256)] = 4,  # A: the tokens to generate
                 answer: Literal["start", "continuation"] = "start",  # the passage's first A tokens | the next A
                 queries_per_passage: Annotated[int, Range(ge=1, le=1000)] = 4):  # training spans per passage/epoch
        super().__init__(batch_size, num_workers, passage_tokens, vocab_size, min_freq, val_fraction, test_fraction,
                         split_seed, n_train)
        if query_tokens + answer_tokens > passage_tokens:
            raise ConfigError("data.answer_tokens", f"query_tokens + answer_tokens = {query_tokens + answer_tokens} "
                              f"exceeds passage_tokens={passage_tokens}")
        self.query_tokens, self.answer_tokens, self.answer = query_tokens, answer_tokens, answer
        self.queries_per_passage = queries_per_passage

    def info(self) -> dict[str, Any]:
        return {**super().info(), "query_tokens": self.query_tokens, "answer_tokens": self.answer_tokens}

    def _start_range(self, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """First and last allowed span start per passage: the span never overlaps the answer."""
        q, a = self.query_tokens, self.answer_tokens
        if self.answer == "start":
            return torch.full_like(lengths, a), lengths - q
        return torch.zeros_like(lengths), lengths - q - a

    def _cut(self, rows: tuple[Tensor, ...], u: Tensor) -> tuple[Tensor, ...]:
        """(tokens (B, L), lengths (B,), gold (B,)), u (B,) in [0, 1) -> (query, answer, gold, passage)."""
        tokens, lengths, gold = rows
        lo, hi = self._start_range(lengths)
        starts = lo + (u * (hi - lo + 1)).long().clamp_max(hi - lo)  # uniform over lo..hi
        q_pos = starts[:, None] + torch.arange(self.query_tokens)  # (B, Q)
        a_pos = torch.arange(self.answer_tokens).expand(len(tokens), -1)  # (B, A): the passage start
        if self.answer == "continuation":
            a_pos = q_pos[:, -1:] + 1 + a_pos
        return tokens.gather(1, q_pos), tokens.gather(1, a_pos), gold, self.index_ids[gold]

    def _passages(self, split: str, repeat: int) -> tuple[Tensor, Tensor, Tensor]:
        c = self.corpus
        rows = [(i, [t for s in c.ids(i) for t in s]) for i in self.indices(split)]
        lengths = torch.tensor([len(t) for _, t in rows], dtype=torch.long)
        lo, hi = self._start_range(lengths)
        keep = [k for k in range(len(rows)) if hi[k] >= lo[k]]
        tokens = pad_rows([rows[k][1] for k in keep], self.passage_tokens)
        gold = torch.tensor([int(rows[k][0]) for k in keep], dtype=torch.long)
        return tokens.repeat(repeat, 1), lengths[keep].repeat(repeat), gold.repeat(repeat)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        c = self.corpus
        self.index_ids = pad_rows([self.wrap([t for s in c.ids(i) for t in s]) for i in range(len(c.passages))],
                                  self.passage_tokens + 2)
        # training spans are drawn afresh for every batch; val/test spans (2 per passage) once, seeded
        self.train_set = TensorTupleDataset(*self._passages("train", self.queries_per_passage),
                                            transform=lambda rows: self._cut(rows, torch.rand(len(rows[0]))))
        evals = []
        for split in ("val", "test"):
            rows = self._passages(split, 2)
            u = torch.rand(len(rows[0]), generator=torch.Generator().manual_seed(self.split_seed * 10 + len(evals)))
            evals.append(TensorTupleDataset(*self._cut(rows, u)))
        self.val_set, self.test_set = evals
