"""Chapter 4: the character-level language model `char_lm` (Karpathy's char-rnn, in miniature).

Trained by teacher forcing on (B, T) windows of the `text_chars` data: the cross-entropy of the
next character at every position, backpropagated through the T steps of the window (truncated BPTT:
every window starts from a zero state). Metrics: {train,val,test}/loss in nats per character and
{train,val,test}/bpc = loss / ln 2 (bits per character; a uniform guess over V characters costs
log2 V, e.g. 6.7 bits for the ~100 characters of the pydoc corpus).

At the end of fit (rank 0) it samples `sample_length` characters after `prompt` at `temperature`
and stores prompt + sample as the text artifact samples/generated.txt. The vocabulary comes from
the datamodule (at fit start) and is kept in the buffer `vocab_codes` (the characters' code points),
so it is part of the state_dict and a model loaded from a checkpoint (litlab.load) can generate.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from litlab.chapters.rnn.module import CHAPTER, Cell, Embedding, GradNormLogging, Hidden, Layers, VocabSize
from litlab.chapters.rnn.nets import CharLM
from litlab.data.text import CharVocab
from litlab.module import log_text
from litlab.registry import register_model
from litlab.schema import Range
from litlab.steps import NextTokenSteps


@register_model(
    "char_lm",
    chapter=CHAPTER,
    description="Character-level language model (RNN/LSTM/GRU): bits per character, samples text at the end",
    smoke={"model": {"cell": "lstm", "hidden": 16, "num_layers": 2, "embedding": 8, "dropout": 0.1,
                     "sample_length": 20},
           "data": {"name": "text_chars", "max_chars": 20000, "seq_len": 16, "batch_size": 8}},
)
class CharLMModule(GradNormLogging, NextTokenSteps):
    def __init__(
        self,
        vocab_size: VocabSize,
        cell: Cell = "lstm",
        hidden: Hidden = 256,
        num_layers: Layers = 2,
        embedding: Embedding = 64,  # None: one-hot characters
        dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0,  # on inputs, between layers and on outputs
        fast: bool = True,  # torch's fused layer; False: the hand-written cells, step by step
        nonlinearity: Literal["tanh", "relu"] = "tanh",  # vanilla RNN only
        forget_bias: float = 1.0,  # LSTM only: added to b_if at init
        temperature: Annotated[float, Range(ge=0, le=100)] = 0.8,  # sampling; 0 = greedy
        prompt: str = "The ",
        sample_length: Annotated[int, Range(ge=0, le=1_000_000)] = 500,
        sample_seed: Annotated[int, Range(ge=0, lt=2**63)] = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = CharLM(vocab_size, cell, hidden, num_layers, embedding, dropout, fast, nonlinearity, forget_bias)
        # ids 1..V-1 as Unicode code points (id 0 = unknown); all zero until set from the datamodule
        self.register_buffer("vocab_codes", torch.zeros(vocab_size - 1, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]  # ids (B, T) -> next-character logits (B, T, V)

    # ---------------------------------------------------------------- vocabulary and sampling
    @property
    def vocab(self) -> CharVocab | None:
        codes = self.vocab_codes.tolist()
        return CharVocab("".join(map(chr, codes))) if any(codes) else None

    def on_fit_start(self):
        vocab = getattr(getattr(self.trainer, "datamodule", None), "vocab", None)
        if isinstance(vocab, CharVocab):
            if len(vocab) != self.hparams.vocab_size:
                raise ValueError(f"the data's vocabulary has {len(vocab)} ids, the model {self.hparams.vocab_size}")
            self.vocab_codes.copy_(torch.tensor([ord(c) for c in vocab.chars], dtype=torch.long))

    def generate(self, prompt: str | None = None, length: int | None = None, temperature: float | None = None,
                 seed: int | None = None) -> str:
        """prompt + `length` sampled characters (defaults: the model's prompt, sample_length, ...)."""
        vocab = self.vocab
        if vocab is None:
            raise RuntimeError("no vocabulary: fit on a text_chars datamodule or load a trained checkpoint first")
        h = self.hparams
        prompt = h.prompt if prompt is None else prompt
        length = h.sample_length if length is None else length
        temperature = h.temperature if temperature is None else temperature
        g = torch.Generator(device=self.device).manual_seed(h.sample_seed if seed is None else seed)
        ids = vocab.encode(prompt or "\n").to(self.device)  # an empty prompt starts after a newline
        sample = self.net.generate(ids, length, temperature, generator=g)
        return prompt + vocab.decode(sample.tolist())

    def on_fit_end(self):
        if not self.trainer.is_global_zero or not self.loggers or self.vocab is None:
            return
        h = self.hparams
        text = self.generate()
        header = f"# {h.cell}, {h.num_layers}x{h.hidden}, temperature {h.temperature}, prompt {h.prompt!r}\n\n"
        log_text(self, header + text + "\n", "samples/generated.txt")
