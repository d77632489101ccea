"""Chapter 5-6 LightningModule: the registered `transformer_seq2seq` encoder-decoder transformer on
the generated translation tasks (`seq2seq_task`: reverse, sort, date -> ISO).

Same conventions as the RNN `seq2seq` model (chapters/seq2seq/module.py), so the two compare
directly: teacher-forced cross-entropy (PAD ignored) for training; validation/test add GREEDY
decoding (here with a KV cache) and report exact_match (whole sequence incl. EOS right) and
token_acc (target positions right). Metric names: train/loss, val/loss, val/exact_match,
val/token_acc, test/loss, test/exact_match, test/token_acc. At the end of fit the cross-attention
maps of one validation example (decoder layers x heads) are stored as plots/cross_attention.png.

Any attention backend (math, sdpa, performer, sliding_window, bigbird) is chosen with `backend`;
its options go in `backend_options` (e.g. {window: 8, global_tokens: 1} for sliding_window).
"""

from __future__ import annotations

import inspect
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from litlab.chapters.seq2seq.module import TranslationSteps
from litlab.chapters.transformer.encoder_decoder import TransformerEncoderDecoder
from litlab.data.seq2seq_tasks import EOS, PAD
from litlab.errors import ConfigError
from litlab.registry import register_model
from litlab.schema import Range

CHAPTER = "5-6 Attention and transformers"
PosInt = Annotated[int, Range(ge=1, le=65536)]
Backend = Literal["math", "sdpa", "performer", "sliding_window", "bigbird"]


def check_backend_options(backend: str, options: dict | None, key: str = "model.backend_options") -> dict:
    """The options a backend accepts, by name; anything else is a ConfigError."""
    from litlab.chapters.transformer.performer import PerformerFeatures
    from litlab.chapters.transformer.sparse import bigbird_attention, sliding_window_attention

    options = dict(options or {})
    target = {"performer": PerformerFeatures.__init__, "sliding_window": sliding_window_attention,
              "bigbird": bigbird_attention}.get(backend)
    allowed = set() if target is None else {
        n for n, p in inspect.signature(target).parameters.items()
        if p.kind == p.KEYWORD_ONLY or (backend == "performer" and n not in ("self", "head_dim"))
    } - {"causal", "attn_mask", "dropout_p"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(key, f"backend {backend!r} takes {sorted(allowed) or 'no options'}, got {unknown}")
    return options


@register_model(
    "transformer_seq2seq",
    chapter=CHAPTER,
    description="Encoder-decoder transformer (post-/pre-LN, sinusoidal/learned/RoPE, 5 attention backends), "
                "greedy KV-cache decoding",
    smoke={"model": {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32},
           "data": {"name": "seq2seq_task", "n_train": 32, "n_val": 16, "n_test": 16, "batch_size": 8}},
)
class TransformerSeq2SeqModule(TranslationSteps):
    """n_layers encoder blocks and n_layers decoder blocks of width d_model. norm_first=False is
    the original/course post-LN block, True pre-LN (more stable at depth; adds a final LayerNorm).
    vocab_size and max_target_len come from the data's info(); max_len sizes the position tables."""

    def __init__(
        self,
        vocab_size: Annotated[int, Range(ge=4)],
        max_target_len: PosInt,
        d_model: PosInt = 64,
        n_heads: Annotated[int, Range(ge=1, le=256)] = 4,
        n_layers: Annotated[int, Range(ge=1, le=48)] = 2,
        d_ff: PosInt = 256,
        dropout: Annotated[float, Range(ge=0, lt=1)] = 0.1,
        norm_first: bool = True,
        positional: Literal["sinusoidal", "learned", "rope"] = "sinusoidal",
        backend: Backend = "sdpa",
        backend_options: dict | None = None,
        activation: Literal["gelu", "relu"] = "gelu",
        label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.0,
        max_len: PosInt = 512,
        plot_example: bool = True,  # plots/cross_attention.png at the end of fit
    ):
        super().__init__()
        if d_model % n_heads:
            raise ConfigError("model.n_heads", f"must divide d_model={d_model}, got {n_heads}")
        if positional == "rope" and (d_model // n_heads) % 2:
            raise ConfigError("model.positional", f"rope needs an even head dimension, got {d_model // n_heads}")
        options = check_backend_options(backend, backend_options)
        self.save_hyperparameters()
        self.max_target_len = max_target_len
        self.net = TransformerEncoderDecoder(vocab_size, d_model, n_heads, n_layers, d_ff, dropout, norm_first,
                                             positional, backend, options, max_len, activation)
        self._make_metrics()

    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor) -> Tensor:
        return self.net(src, src_len, tgt_in)  # teacher-forced logits (B, T, V)

    def greedy(self, src: Tensor, src_len: Tensor, max_len: int | None = None, **kwargs):
        """Greedy tokens (B, L) (PAD after EOS) and, with keep_weights=True, per-layer cross-attention."""
        return self.net.greedy(src, src_len, max_len or self.max_target_len, **kwargs)

    def _loss(self, batch) -> Tensor:
        src, src_len, tgt_in, tgt_out = batch
        logits = self(src, src_len, tgt_in)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD,
                               label_smoothing=self.hparams.label_smoothing)

    # ------------------------------------------------------------ attention maps
    def on_fit_end(self):
        if (not self.hparams.plot_example or not self.trainer.is_global_zero
                or not any(hasattr(lg, "log_figure") for lg in self.loggers)):
            return
        dm = getattr(self.trainer, "datamodule", None)
        dataset = getattr(dm, "val_set", None)
        if dataset is None or not hasattr(dataset, "__getitems__"):
            return
        src, src_len, _, _ = dataset.__getitems__([0])
        self.log_figure(self.plot_cross_attention(src, src_len, getattr(dm, "vocab", None)),
                        "plots/cross_attention.png")

    @torch.no_grad()
    def plot_cross_attention(self, src: Tensor, src_len: Tensor, vocab=None):
        """Figure: cross-attention (generated x source tokens) of example 0, one panel per decoder
        layer and head, from greedy decoding."""
        from matplotlib.figure import Figure

        was_training = self.training
        self.eval()
        pred, cross = self.greedy(src[:1].to(self.device), src_len[:1].to(self.device), keep_weights=True)
        self.train(was_training)
        label = vocab.tokens if vocab is not None else (lambda ids: [str(i) for i in ids.tolist()])
        s = int(src_len[0])
        stop = (pred[0] == EOS).nonzero()
        g = int(stop[0]) + 1 if len(stop) else pred.shape[1]
        layers, heads = len(cross), cross[0].shape[1]
        fig = Figure(figsize=(3.2 * heads, 3.0 * layers + 0.6), layout="constrained")
        axes = fig.subplots(layers, heads, squeeze=False)
        for li in range(layers):
            for h in range(heads):
                ax = axes[li, h]
                im = ax.imshow(cross[li][0, h, :g, :s].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1,
                               aspect="auto")
                ax.set_xticks(range(s), label(src[0, :s]), fontsize=6)
                ax.set_yticks(range(g), label(pred[0, :g]), fontsize=6)
                ax.set_title(f"layer {li + 1}, head {h + 1}", fontsize=8)
        fig.colorbar(im, ax=axes.flatten().tolist(), label="cross-attention weight", shrink=0.8)
        fig.suptitle("decoder cross-attention (rows: generated tokens, columns: source tokens)")
        return fig
