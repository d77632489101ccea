"""The pydoc corpus as passages of words: tokenizer, passage split, BERT masking, sentence pairs.

Corpus: `pydoc_data.topics.topics`, the English text Python ships for `help()` (79 topics, ~465 KB,
offline). Several topics repeat others verbatim ("compound" holds "if", "while", ...; "specialnames"
holds "customization", ...), so paragraphs are de-duplicated (first occurrence kept, topics in
dict order) before anything else: ~2070 paragraphs, ~93k tokens.

Tokenizer (word level, built offline from the corpus, no WordPiece): lower-cased identifiers
`[a-z_][a-z_0-9]*`, digit runs, and runs of one repeated punctuation character ("-----" is one
token); ids 0..4 are [PAD] [UNK] [CLS] [SEP] [MASK], then the TRAIN split's tokens by frequency.

Passages: the sentences of a topic packed greedily, in order, into passages of at most
`passage_tokens` tokens (a longer sentence is cut). Every passage goes to train / val / test by a
seeded permutation (80/10/10 by default); all the corpus tasks (corpus_tasks.py: MLM, doc-section
classification, retrieval, RAG) share this split, so an encoder pretrained with MLM has never read
the passages a fine-tuned model is tested on, and its vocabulary (`Vocab.signature`) matches.

BERT masking (Devlin et al. 2019, as its create_pretraining_data does it): a row of m non-special
tokens selects exactly n = max(1, round(0.15 m)) of them (at most max_predictions), uniformly at
random; a selected token becomes [MASK] with p 0.8, a random non-special token with p 0.1, and stays
unchanged with p 0.1. Labels are the original ids at selected positions and -100 (ignored) elsewhere.
A fixed cap on the count per row lets the model score a fixed number of slots per row (static
shapes, nothing read back from the device) instead of a data-dependent number of positions.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))
NUM_SPECIAL = len(SPECIALS)
IGNORE = -100  # label of a position the loss skips (F.cross_entropy's ignore_index)

_TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+|([^\sA-Za-z_\d])\1*")
_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+")
_UNDERLINE = re.compile(r"[*=\-]+")

# Where each topic comes from in the Python documentation: the label of the classification task
# (Language Reference chapters; the Library Reference's built-in types, string and pdb pages).
DOC_SECTIONS = {
    "simple statements": "assert assignment augassign break continue del global import nonlocal pass raise "
                         "return yield",
    "compound statements": "async class compound else for function if try while with",
    "expressions": "atom-identifiers atom-literals attribute-references await binary bitwise booleans calls "
                   "comparisons conversions dict exprlists in lambda lists operator-summary power shifting "
                   "slicings subscriptions unary",
    "lexical analysis": "floating id-classes identifiers imaginary integers numbers strings",
    "data model": "attribute-access callable-types context-managers customization numeric-types objects "
                  "sequence-types specialnames types",
    "execution model": "dynamic-features exceptions execmodel naming",
    "library": "bltin-code-objects bltin-ellipsis-object bltin-null-object bltin-type-objects debugger "
               "formatstrings specialattrs string-methods truth typesfunctions typesmapping typesmethods "
               "typesmodules typesseq typesseq-mutable",
}
SECTION_NAMES = tuple(DOC_SECTIONS)
TOPIC_SECTION = {t: i for i, name in enumerate(SECTION_NAMES) for t in DOC_SECTIONS[name].split()}


def tokenize(text: str) -> list[str]:
    """'The "assert" statement\\n*****' -> ['the', '"', 'assert', '"', 'statement', '*****']."""
    return [m.group(0).lower() for m in _TOKEN.finditer(text)]


def pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return dict(topics)


def paragraphs(topics: dict[str, str]) -> list[tuple[str, str]]:
    """(topic, paragraph) in order; blank-line separated, heading underlines dropped, duplicates
    (same words, whatever the line breaks) kept only at their first occurrence."""
    seen: set[str] = set()
    out = []
    for topic, text in topics.items():
        for para in re.split(r"\n\s*\n", text):
            para = para.strip()
            key = " ".join(para.split())
            if not para or _UNDERLINE.fullmatch(para) or key in seen:
                continue
            seen.add(key)
            out.append((topic, para))
    return out


@dataclass
class Passage:
    topic: str
    sentences: list[list[str]]  # tokens, sentence by sentence

    @property
    def tokens(self) -> list[str]:
        return [t for s in self.sentences for t in s]

    @property
    def section(self) -> int:
        return TOPIC_SECTION[self.topic]


def make_passages(topics: dict[str, str], passage_tokens: int) -> list[Passage]:
    """Sentences of each topic packed in order into passages of <= passage_tokens tokens."""
    passages: list[Passage] = []
    current: Passage | None = None
    size = 0
    for topic, para in paragraphs(topics):
        if current is not None and current.topic != topic:
            passages.append(current)
            current, size = None, 0
        for sentence in _SENTENCE_END.split(para):
            tokens = tokenize(sentence)
            for i in range(0, len(tokens), passage_tokens):  # a sentence longer than a passage is cut
                chunk = tokens[i: i + passage_tokens]
                if current is not None and size + len(chunk) > passage_tokens:
                    passages.append(current)
                    current, size = None, 0
                if current is None:
                    current = Passage(topic, [])
                current.sentences.append(chunk)
                size += len(chunk)
    if current is not None:
        passages.append(current)
    return passages


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A seeded permutation of range(n) cut into train / val / test (sorted index arrays)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    parts = {"val": perm[:n_val], "test": perm[n_val:n_val + n_test], "train": perm[n_val + n_test:]}
    return {k: np.sort(v) for k, v in parts.items()}


class Vocab:
    """Word vocabulary: ids 0..4 the specials, then tokens (most frequent first); unknown -> [UNK]."""

    def __init__(self, tokens: list[str]):
        self.itos = [*SPECIALS, *tokens]
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: list[list[str]], max_size: int | None = None, min_freq: int = 1) -> Vocab:
        counts = Counter(t for tokens in texts for t in tokens)
        ranked = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            ranked = ranked[: max(0, max_size - NUM_SPECIAL)]
        return cls(ranked)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def signature(self) -> str:
        """A short hash of the token list: two models can share weights only if theirs are equal."""
        return hashlib.sha1("\n".join(self.itos).encode()).hexdigest()[:12]

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.stoi.get(t, UNK) for t in tokens]

    def decode(self, ids) -> str:
        return " ".join(self.itos[int(i)] for i in ids if int(i) != PAD)


@dataclass
class Corpus:
    passages: list[Passage]
    split: dict[str, np.ndarray]  # split name -> passage indices
    vocab: Vocab

    def ids(self, index: int) -> list[list[int]]:
        """The passage's sentences as token ids."""
        return [self.vocab.encode(s) for s in self.passages[index].sentences]


@lru_cache(maxsize=8)
def load_corpus(passage_tokens: int = 64, val_fraction: float = 0.1, test_fraction: float = 0.1,
                split_seed: int = 0, vocab_size: int | None = None, min_freq: int = 1) -> Corpus:
    """Passages, their split and the vocabulary of the train passages (cached: treat as read-only)."""
    passages = make_passages(pydoc_topics(), passage_tokens)
    split = split_indices(len(passages), val_fraction, test_fraction, split_seed)
    vocab = Vocab.build([passages[i].tokens for i in split["train"]], vocab_size, min_freq)
    return Corpus(passages, split, vocab)


def pad_rows(rows: list[list[int]], length: int | None = None) -> Tensor:
    """Right-pad int lists with [PAD] -> int64 (N, length), length defaults to the longest row."""
    length = length if length is not None else max((len(r) for r in rows), default=1)
    out = torch.full((len(rows), length), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) > length:
            raise ValueError(f"row {i} has {len(r)} ids, more than {length}")
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def mlm_predictions(tokens: int, mask_prob: float) -> int:
    """The most positions mask_tokens selects in a row of `tokens` non-special tokens."""
    return max(1, round(tokens * mask_prob))


def mask_tokens(ids: Tensor, vocab_size: int, mask_prob: float = 0.15, generator: torch.Generator | None = None,
                mask_fraction: float = 0.8, random_fraction: float = 0.1,
                max_predictions: int | None = None) -> tuple[Tensor, Tensor]:
    """BERT's masked-LM corruption. ids (B, T) int64 -> (inputs (B, T), labels (B, T)).

    Only non-special tokens (id >= NUM_SPECIAL) can be selected: a row with m of them selects
    exactly n = min(max(1, round(mask_prob * m)), max_predictions, m) of them, uniformly at random.
    Of the selected ones: [MASK] with p mask_fraction, a uniform random non-special token with p
    random_fraction, unchanged otherwise. labels = ids at selected positions, IGNORE (-100) elsewhere.
    """
    u_select = torch.rand(ids.shape, generator=generator, device=ids.device)
    u_action = torch.rand(ids.shape, generator=generator, device=ids.device)
    random_ids = torch.randint(NUM_SPECIAL, vocab_size, ids.shape, generator=generator, device=ids.device)
    candidate = ids >= NUM_SPECIAL
    m = candidate.sum(1)  # (B,)
    # round() in float64, half to even, as Python's round (and mlm_predictions) do it
    n = torch.round(m.double() * mask_prob).long().clamp_min(1)
    if max_predictions is not None:
        n = n.clamp_max(max_predictions)
    n = torch.minimum(n, m)
    # a random order of each row's candidates (non-candidates sort after them): its first n
    rank = u_select.masked_fill(~candidate, 2.0).argsort(1).argsort(1)  # (B, T)
    selected = rank < n[:, None]
    to_mask = selected & (u_action < mask_fraction)
    to_random = selected & (u_action >= mask_fraction) & (u_action < mask_fraction + random_fraction)
    inputs = torch.where(to_mask, torch.full_like(ids, MASK), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    return inputs, labels


def split_in_two(sentences: list[list[int]]) -> tuple[list[int], list[int]]:
    """Segment A, segment B: the passage cut at the sentence boundary nearest its middle (at the
    middle token when it has one sentence). Both non-empty for a passage of >= 2 tokens."""
    flat = [t for s in sentences for t in s]
    bounds = np.cumsum([len(s) for s in sentences])[:-1]
    bounds = [b for b in bounds if 0 < b < len(flat)]
    mid = len(flat) / 2
    cut = min(bounds, key=lambda b: abs(b - mid)) if bounds else len(flat) // 2
    return flat[:cut], flat[cut:]


def sentence_pairs(corpus: Corpus, indices: np.ndarray, rng: np.random.Generator, nsp: bool,
                   max_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """[CLS] A [SEP] B [SEP] rows for the passages `indices` (those of >= 2 tokens).

    A, B: the two halves of a passage (split_in_two). With `nsp`, half the rows (chosen at random)
    replace B by the B of a random passage of ANOTHER topic in the same split (label 0; 1 = B really
    follows A). Returns ids (N, max_tokens + 3), segment ids (N, max_tokens + 3) (0 for [CLS] A [SEP],
    1 for B [SEP], 0 on padding), next-sentence labels (N,).
    """
    halves = [split_in_two(corpus.ids(i)) for i in indices]
    keep = [k for k, (a, b) in enumerate(halves) if a and b]
    topics = np.array([corpus.passages[indices[k]].topic for k in keep])
    rows, segments, labels = [], [], []
    for j, k in enumerate(keep):
        a, b = halves[k]
        is_next = 1
        if nsp and rng.random() < 0.5:
            others = np.flatnonzero(topics != topics[j])
            if len(others):
                b = halves[keep[int(rng.choice(others))]][1]
                is_next = 0
        b = b[: max(1, max_tokens - len(a))]
        a = a[: max_tokens - len(b)]
        rows.append([CLS, *a, SEP, *b, SEP])
        segments.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
        labels.append(is_next)
    length = max_tokens + 3
    return pad_rows(rows, length), pad_rows(segments, length), torch.tensor(labels, dtype=torch.long)
