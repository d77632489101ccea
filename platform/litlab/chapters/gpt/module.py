"""LightningModules `gpt` (dense) and `gpt_moe` (mixture-of-experts FFNs) over `text_chars` data.

Training: teacher forcing on (B, T) windows, L = mean over the B T positions of -log p(x_{t+1} | x_<=t)
(nats per token). Logged per stage: {stage}/loss, {stage}/bpc = loss / ln 2 (bits per character or
byte; uniform over V tokens costs log2 V) and {stage}/perplexity = exp(mean loss over the epoch).

`gpt_moe` adds aux_loss_coef * L_aux (the load-balancing loss, moe.py; mean over the MoE layers) to
the training loss and logs train/aux_loss, the per-epoch expert utilisation
train/expert_frac_e{i} (share of routing slots sent to expert i, mean over MoE layers; 1/E is
balanced), train/expert_imbalance (E * max_i f_i, mean over layers; 1 is balanced), and at the end
the figure plots/expert_utilisation.png.

At the end of fit it samples `sample_length` tokens after `prompt` (temperature, top_k) and stores
prompt + sample as samples/generated.txt. The vocabulary comes from the datamodule at fit start and
is kept in buffers (part of the state_dict), so a checkpoint loaded with litlab.load can generate.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from litlab.chapters.gpt.nets import GPT
from litlab.data.text import ByteVocab, CharVocab
from litlab.epoch_stats import DeviceMean
from litlab.errors import ConfigError
from litlab.module import log_text
from litlab.registry import register_model
from litlab.schema import Range
from litlab.steps import NextTokenSteps

CHAPTER = "5-6 Attention and transformers"
MOE_CHAPTER = "12 LLM techniques"

VocabSize = Annotated[int, Range(ge=2, le=10_000_000)]
BlockSize = Annotated[int, Range(ge=1, le=1_000_000)]  # the longest context the model sees
Depth = Annotated[int, Range(ge=1, le=512)]
Width = Annotated[int, Range(ge=1, le=65_536)]
Dropout = Annotated[float, Range(ge=0, lt=1)]
Positional = Literal["learned", "sinusoidal", "rope"]
Backend = Literal["math", "sdpa", "performer", "sliding_window", "bigbird"]
Temperature = Annotated[float, Range(ge=0, le=100)]  # sampling; 0 = greedy
TopK = Annotated[int, Range(ge=1)] | None  # sampling: keep the k most likely tokens; None = all
Length = Annotated[int, Range(ge=0, le=1_000_000)]
Seed = Annotated[int, Range(ge=0, lt=2**63)]


class ExpMean(DeviceMean):
    """exp of the (weighted) mean: perplexity = exp(mean NLL over the epoch's tokens)."""

    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute())


class GPTBase(NextTokenSteps):
    def _build(self, h) -> None:
        if h.d_model % h.n_head:
            raise ConfigError("model.d_model", f"{h.d_model} is not divisible by model.n_head={h.n_head}")
        if h.positional == "rope" and (h.d_model // h.n_head) % 2:
            raise ConfigError("model.positional", f"rope needs an even head dimension, d_model / n_head = "
                                                  f"{h.d_model // h.n_head}")
        if h.sample_top_k is not None and h.sample_top_k > h.vocab_size:
            raise ConfigError("model.sample_top_k", f"{h.sample_top_k} > vocab_size {h.vocab_size}")
        moe = {k: h[k] for k in ("n_experts", "moe_top_k", "moe_every", "noisy_gating", "capacity_factor",
                                 "moe_dispatch") if k in h}
        self.net = GPT(h.vocab_size, h.block_size, h.n_layer, h.n_head, h.d_model, h.d_ff, h.dropout,
                       h.positional, h.attention, h.attention_options, h.tie_weights, **moe)
        self.perplexity = torch.nn.ModuleDict({f"{s}_ppl": ExpMean() for s in ("train", "val", "test")})
        # vocabulary: kind 0 = not set yet, 1 = characters (codes = code points, id 0 unknown), 2 = bytes
        self.register_buffer("vocab_kind", torch.zeros((), dtype=torch.long))
        self.register_buffer("vocab_codes", torch.zeros(h.vocab_size, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # ids (B, T) -> next-token logits (B, T, V)

    def log_step_extras(self, stage: str, loss: torch.Tensor, y: torch.Tensor) -> None:
        ppl = self.perplexity[f"{stage}_ppl"]
        ppl.update(loss, weight=y.numel())
        self.log(f"{stage}/perplexity", ppl, on_step=False, on_epoch=True)

    # ---------------------------------------------------------------- vocabulary and sampling
    @property
    def vocab(self) -> CharVocab | ByteVocab | None:
        kind = int(self.vocab_kind)
        if kind == 1:
            return CharVocab("".join(map(chr, self.vocab_codes[1:].tolist())))
        return ByteVocab() if kind == 2 else None

    def on_fit_start(self):
        dm = getattr(self.trainer, "datamodule", None)
        seq_len = getattr(dm, "seq_len", None)
        if isinstance(seq_len, int) and seq_len > self.hparams.block_size:
            raise ConfigError("model.block_size", f"{self.hparams.block_size} < data.seq_len {seq_len}: the "
                                                  "model cannot see a whole training window")
        vocab = getattr(dm, "vocab", None)
        if isinstance(vocab, (CharVocab, ByteVocab)):
            if len(vocab) != self.hparams.vocab_size:
                raise ValueError(f"the data's vocabulary has {len(vocab)} ids, the model {self.hparams.vocab_size}")
            if isinstance(vocab, CharVocab):
                self.vocab_kind.fill_(1)
                self.vocab_codes.copy_(torch.tensor([0xFFFD] + [ord(c) for c in vocab.chars]))
            else:
                self.vocab_kind.fill_(2)
                self.vocab_codes.copy_(torch.arange(256))

    def generate_text(self, prompt: str | None = None, length: int | None = None,
                      temperature: float | None = None, top_k: int | None = -1, seed: int | None = None,
                      use_cache: bool = True) -> str:
        """prompt + `length` sampled characters/bytes (defaults: the model's prompt, sample_length,
        temperature, sample_top_k (top_k=-1 means "the default"), sample_seed)."""
        vocab = self.vocab
        if vocab is None:
            raise RuntimeError("no vocabulary: fit on a text_chars datamodule or load a trained checkpoint first")
        h = self.hparams
        prompt = h.prompt if prompt is None else prompt
        g = torch.Generator(device=self.device).manual_seed(h.sample_seed if seed is None else seed)
        ids = vocab.encode(prompt or "\n").to(self.device)[None]  # (1, T0); an empty prompt starts after "\n"
        out = self.net.generate(ids, h.sample_length if length is None else length,
                                h.temperature if temperature is None else temperature,
                                h.sample_top_k if top_k == -1 else top_k, generator=g, use_cache=use_cache)
        return prompt + vocab.decode(out[0, ids.shape[1]:].tolist())

    def on_fit_end(self):
        if not self.trainer.is_global_zero or not self.loggers or self.vocab is None:
            return
        h = self.hparams
        text = self.generate_text()
        header = (f"# {type(self).registry_name}: {h.n_layer} layers x {h.d_model}, {h.n_head} heads, "
                  f"temperature {h.temperature}, top_k {h.sample_top_k}, prompt {h.prompt!r}\n\n")
        log_text(self, header + text + "\n", "samples/generated.txt")
        self.log_attention_figure(text)

    ATTENTION_TOKENS = 40  # the stretch of the sample shown in plots/attention.png

    def log_attention_figure(self, text: str) -> None:
        """plots/attention.png: the self-attention of a few layers and heads over the start of the
        sample. Only for the exact backends (math, sdpa); the efficient ones attend differently."""
        if self.hparams.attention not in ("math", "sdpa") or not any(hasattr(lg, "log_figure") for lg in self.loggers):
            return
        import matplotlib.pyplot as plt

        from litlab.chapters.gpt.figures import attention_weights, self_attention_figure, shown_layers

        vocab = self.vocab
        ids = vocab.encode(text)[: min(self.ATTENTION_TOKENS, self.hparams.block_size)]
        if len(ids) < 2:
            return
        layers = shown_layers(self.hparams.n_layer)
        weights = attention_weights(self.net, ids[None].to(self.device), layers)
        tokens = [vocab.decode([int(i)]) for i in ids]
        fig = self_attention_figure(weights, tokens, f"{type(self).registry_name}: causal self-attention over its "
                                                    "own sample (rows: queries, columns: keys)")
        self.log_figure(fig, "plots/attention.png")
        plt.close(fig)


@register_model(
    "gpt",
    chapter=CHAPTER,
    description="GPT decoder-only causal transformer LM (pre-LN, tied embeddings, KV-cache sampling), bits per char",
    smoke={"model": {"n_layer": 2, "n_head": 2, "d_model": 16, "block_size": 16, "dropout": 0.1,
                     "sample_length": 20},
           "data": {"name": "text_chars", "max_chars": 20000, "seq_len": 16, "batch_size": 8}},
)
class GPTModule(GPTBase):
    def __init__(
        self,
        vocab_size: VocabSize,
        block_size: BlockSize = 128,  # >= data.seq_len; generation crops the context to it
        n_layer: Depth = 4,
        n_head: Depth = 4,
        d_model: Width = 128,
        d_ff: Width | None = None,  # None: 4 d_model
        dropout: Dropout = 0.0,  # embeddings, attention weights, residual branches, FFN hidden
        positional: Positional = "learned",  # rope: rotary queries/keys in every layer
        attention: Backend = "sdpa",
        attention_options: dict | None = None,  # e.g. {window: 32} for sliding_window
        tie_weights: bool = True,  # output projection = token embedding matrix
        temperature: Temperature = 0.8,
        sample_top_k: TopK = None,
        prompt: str = "The ",
        sample_length: Length = 500,
        sample_seed: Seed = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self._build(self.hparams)
