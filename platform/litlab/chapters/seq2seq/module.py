"""Chapter 4 LightningModule: the registered `seq2seq` encoder-decoder (with or without attention).

Training: teacher forcing (the decoder reads the true previous token, tgt_in) and the cross-entropy
of every target token incl. EOS, PAD ignored. Validation/test: the same teacher-forced loss, plus
GREEDY decoding (the decoder reads its own argmax) for
    exact_match  fraction of sequences whose greedy output equals the target exactly, EOS included
    token_acc    fraction of target tokens (EOS included) that the greedy output has right at the
                 same position (a missing or extra token shifts nothing: positions are compared)
Metric names: train/loss, val/loss, val/exact_match, val/token_acc, test/loss, test/exact_match,
test/token_acc. At the end of fit, attention models store plots/attention.png: source x generated
tokens heatmaps of alpha_ij for a few validation examples.

Batches are (src, src_len, tgt_in, tgt_out), see litlab.data.seq2seq_tasks.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from litlab.chapters.seq2seq.nets import Seq2Seq
from litlab.data.seq2seq_tasks import EOS, PAD
from litlab.epoch_stats import DeviceMean
from litlab.module import LitlabModule
from litlab.registry import register_model
from litlab.schema import Range

CHAPTER = "4 Recurrent networks"
PosInt = Annotated[int, Range(ge=1, le=65536)]


def exact_and_token_hits(pred: Tensor, tgt_out: Tensor) -> tuple[Tensor, Tensor]:
    """pred (B, L) greedy tokens (PAD after EOS), tgt_out (B, T) -> exact (B,) bool, and a bool per
    non-PAD target position (1-D): does pred hold the same token there."""
    width = max(pred.shape[1], tgt_out.shape[1])
    p = F.pad(pred, (0, width - pred.shape[1]), value=PAD)
    t = F.pad(tgt_out, (0, width - tgt_out.shape[1]), value=PAD)
    same = p == t  # (B, W)
    return same.all(1), same[t != PAD]


class TranslationSteps(LitlabModule):
    """The steps every encoder-decoder of the course shares. A subclass gives `_loss(batch)`
    (teacher-forced cross-entropy over (src, src_len, tgt_in, tgt_out) batches) and
    `greedy(src, src_len) -> (tokens (B, L), ...)`; this logs train/loss, {val,test}/loss,
    exact_match (the whole target right) and token_acc (per non-PAD target token)."""

    def _make_metrics(self) -> None:
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": DeviceMean()
            for stage in ("val", "test") for name in ("exact_match", "token_acc")
        })

    def smoke_forward(self, batch) -> Tensor:
        src, src_len, tgt_in, _ = batch
        return self(src, src_len, tgt_in)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, batch_size=batch[0].shape[0])
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        src, src_len, _, tgt_out = batch
        self.log(f"{stage}/loss", self._loss(batch), on_epoch=True, prog_bar=stage == "val", sync_dist=True,
                 batch_size=src.shape[0])
        pred = self.greedy(src, src_len)[0]
        exact, token_hits = exact_and_token_hits(pred, tgt_out)
        for name, hits in (("exact_match", exact), ("token_acc", token_hits)):
            m = self.metrics[f"{stage}_{name}"]
            m.update(hits.float())
            self.log(f"{stage}/{name}", m, on_epoch=True, prog_bar=stage == "val" and name == "exact_match")

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self.greedy(batch[0], batch[1])[0]


@register_model(
    "seq2seq",
    chapter=CHAPTER,
    description="RNN encoder-decoder (GRU/LSTM), teacher forcing + greedy decoding; attention none, bahdanau or luong",
    smoke={"model": {"hidden_size": 16, "embed_dim": 8, "attention": "bahdanau"},
           "data": {"name": "seq2seq_task", "n_train": 32, "n_val": 16, "n_test": 16, "batch_size": 8}},
)
class Seq2SeqModule(TranslationSteps):
    """attention="none" is the fixed-size bottleneck: the decoder sees the source only through its
    initial state (the encoder's final state). bahdanau / luong: see chapters/seq2seq/nets.py.
    vocab_size and max_target_len (the greedy decoder's step limit) come from the data's info().
    attention_dim (bahdanau only; default hidden_size) is the size of v and of W_s s, W_h h."""

    def __init__(
        self,
        vocab_size: Annotated[int, Range(ge=4)],
        max_target_len: PosInt,
        attention: Literal["none", "bahdanau", "luong"] = "bahdanau",
        cell: Literal["gru", "lstm"] = "gru",
        embed_dim: PosInt = 32,
        hidden_size: PosInt = 128,
        num_layers: Annotated[int, Range(ge=1, le=16)] = 1,
        bidirectional: bool = True,  # encoder; its two final states are bridged to the decoder's size
        attention_dim: PosInt | None = None,
        dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0,
        plot_examples: Annotated[int, Range(ge=0, le=16)] = 4,  # heatmaps in plots/attention.png
    ):
        super().__init__()
        self.save_hyperparameters()
        self.max_target_len = max_target_len
        self.net = Seq2Seq(vocab_size, embed_dim, hidden_size, num_layers, cell, bidirectional, attention,
                           attention_dim, dropout)
        self._make_metrics()

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """(src, src_len, tgt_in, tgt_out): src_len stays on the host, where the encoder packs by it
        (from the device, reading it back would stall every step until the GPU caught up)."""
        src, src_len, *targets = batch
        moved = super().transfer_batch_to_device((src, *targets), device, dataloader_idx)
        return type(batch)((moved[0], src_len, *moved[1:]))

    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor) -> Tensor:
        return self.net(src, src_len, tgt_in)[0]  # teacher-forced logits (B, T, V)

    def greedy(self, src: Tensor, src_len: Tensor, max_len: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Greedy tokens (B, L) (PAD after EOS) and attention weights (B, L, S) or None."""
        return self.net.greedy(src, src_len, max_len or self.max_target_len)

    def _loss(self, batch) -> Tensor:
        src, src_len, tgt_in, tgt_out = batch
        logits = self(src, src_len, tgt_in)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)

    # ------------------------------------------------------------ attention maps
    def on_fit_end(self):
        if (self.hparams.attention == "none" or not self.hparams.plot_examples or not self.trainer.is_global_zero
                or not any(hasattr(lg, "log_figure") for lg in self.loggers)):
            return
        dm = getattr(self.trainer, "datamodule", None)
        dataset = getattr(dm, "val_set", None)
        if dataset is None or not hasattr(dataset, "__getitems__"):
            return
        n = min(self.hparams.plot_examples, len(dataset))
        src, src_len, _, _ = dataset.__getitems__(list(range(n)))
        self.log_figure(self.plot_attention(src, src_len, getattr(dm, "vocab", None)), "plots/attention.png")

    @torch.no_grad()
    def plot_attention(self, src: Tensor, src_len: Tensor, vocab=None):
        """A matplotlib Figure: one heatmap of alpha (generated tokens x source tokens) per example.
        `vocab` (litlab.data.seq2seq_tasks.Vocab) labels the axes; ids are shown without it."""
        from matplotlib.figure import Figure

        was_training = self.training
        self.eval()
        pred, alpha = self.greedy(src.to(self.device), src_len)
        self.train(was_training)
        if alpha is None:
            raise ValueError("attention='none' has no attention weights to plot")
        label = vocab.tokens if vocab is not None else (lambda ids: [str(i) for i in ids.tolist()])
        n = len(src)
        cols = min(n, 2)
        rows = (n + cols - 1) // cols
        fig = Figure(figsize=(6 * cols, 5 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).flatten()
        for k in range(n):
            s = int(src_len[k])
            stop = (pred[k] == EOS).nonzero()  # up to and including EOS
            g = int(stop[0]) + 1 if len(stop) else pred.shape[1]
            ax = axes[k]
            im = ax.imshow(alpha[k, :g, :s].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(s), label(src[k, :s]), fontsize=7)
            ax.set_yticks(range(g), label(pred[k, :g]), fontsize=7)
            ax.set(xlabel="source token j", ylabel="generated token i")
            ax.set_title(f"example {k}", fontsize=9)
        for ax in axes[n:]:
            ax.axis("off")
        fig.colorbar(im, ax=axes[:n].tolist(), label=r"$\alpha_{ij}$", shrink=0.8)
        fig.suptitle(f"{self.hparams.attention} attention (greedy decoding)")
        return fig
