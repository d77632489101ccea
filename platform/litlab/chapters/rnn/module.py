"""Chapter 4 LightningModules: `rnn_recall` (vanishing gradients on a long-range memory task) and
shared helpers; the character language model `char_lm` is in lm.py.

Backpropagation through time + gradient clipping: the loss at the end of a sequence is
backpropagated through every step (Lightning's automatic optimisation), and `trainer.gradient_clip_val`
(with `trainer.gradient_clip_algorithm`: norm | value) rescales the gradients after backward and
before the optimiser step. `train/grad_norm` logs the total gradient norm BEFORE clipping (the
exploding gradients that clipping tames show up there).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from litlab.chapters.rnn.nets import SequenceClassifier, grad_norm_by_time
from litlab.module import ClassifierModule
from litlab.registry import register_model
from litlab.schema import Range

CHAPTER = "4 Recurrent networks"

Cell = Literal["rnn", "lstm", "gru"]
Hidden = Annotated[int, Range(ge=1, le=65_536)]
Layers = Annotated[int, Range(ge=1, le=64)]
Embedding = Annotated[int, Range(ge=1, le=65_536)] | None  # None: one-hot inputs
VocabSize = Annotated[int, Range(ge=2, le=10_000_000)]


class GradNormLogging:
    """Mixin for a LightningModule: logs train/grad_norm, the total L2 norm of the gradients before
    clipping (Lightning calls on_before_optimizer_step after unscaling, before clipping), epoch mean."""

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = [p.grad.detach().norm() for p in self.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm(), on_step=False, on_epoch=True, sync_dist=True)


@register_model(
    "rnn_recall",
    chapter=CHAPTER,
    description="RNN/LSTM/GRU classifier for the recall task; plots dL/dh_t by time step (vanishing gradients)",
    smoke={"model": {"cell": "lstm", "hidden": 8, "fast": False},
           "data": {"name": "recall", "seq_len": 5, "n_train": 32, "n_val": 16, "n_test": 16, "batch_size": 16}},
)
class RecallRNN(GradNormLogging, ClassifierModule):
    """Reads the whole sequence (B, T+1) and classifies the first token from the last hidden state.

    At every training epoch end it measures ||dL/dh_t|| at each step t on one fixed batch of
    `probe_size` training sequences (also once before the first update: "init") and logs
    train/grad_ratio_log10 = log10(||dL/dh_0|| / ||dL/dh_T||); every `plot_every_n_epochs` epochs and
    at the end of fit it logs the figure plots/grad_norm_by_time.png (log scale, up to 8 curves).
    """

    def __init__(
        self,
        vocab_size: VocabSize,
        num_classes: Annotated[int, Range(ge=2, le=1_000_000)],
        cell: Cell = "lstm",
        hidden: Hidden = 64,
        num_layers: Layers = 1,
        embedding: Embedding = 16,
        fast: bool = True,  # torch's fused layer; False: the hand-written cells, step by step
        nonlinearity: Literal["tanh", "relu"] = "tanh",  # vanilla RNN only
        forget_bias: float = 1.0,  # LSTM only: added to b_if at init (torch's default is 0)
        plot_every_n_epochs: Annotated[int, Range(ge=1)] = 5,
        probe_size: Annotated[int, Range(ge=1, le=100_000)] = 64,
    ):
        super().__init__(num_classes)
        self.save_hyperparameters()
        self.net = SequenceClassifier(vocab_size, num_classes, cell, hidden, num_layers, embedding, fast,
                                      nonlinearity, forget_bias)
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self._curves: list[tuple[str, torch.Tensor]] = []  # (label, ||dL/dh_t|| (T,))
        self._plotted_at = -1

    # ---------------------------------------------------------------- dL/dh_t probe
    def grad_norm_by_time(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """||dL/dh_t||, t = 0..T (T+1,), on (x, y), default the probe batch (see nets.grad_norm_by_time)."""
        if x is None:
            x, y = self._probe
        return grad_norm_by_time(self.net, x, y).float().cpu()

    def on_train_batch_start(self, batch, batch_idx):
        if self._probe is None:  # the first batch of the run, before any update
            x, y = batch
            self._probe = (x[: self.hparams.probe_size].detach().clone(), y[: self.hparams.probe_size].detach().clone())
            if self.trainer.current_epoch == 0:
                self._curves.append(("init", self.grad_norm_by_time()))

    def on_train_epoch_end(self):
        if self._probe is None:
            return
        epoch = self.trainer.current_epoch + 1  # epochs done
        norms = self.grad_norm_by_time()  # one forward + backward of probe_size sequences: cheap
        self._curves.append((f"epoch {epoch}", norms))
        self.log("train/grad_ratio_log10", torch.log10(norms[0] / norms[-1]), on_step=False, on_epoch=True,
                 sync_dist=True)
        if epoch % self.hparams.plot_every_n_epochs == 0:
            self._log_grad_plot()

    def on_fit_end(self):
        if self._curves and self._plotted_at != len(self._curves):
            self._log_grad_plot()

    def _log_grad_plot(self) -> None:
        if self.trainer.is_global_zero and any(hasattr(lg, "log_figure") for lg in self.loggers):
            self.log_figure(self.plot_grad_norm_by_time(), "plots/grad_norm_by_time.png")
        self._plotted_at = len(self._curves)

    def plot_grad_norm_by_time(self):
        """A matplotlib Figure of the measured curves (at most 8: init, evenly spaced, the last)."""
        from matplotlib import colormaps
        from matplotlib.figure import Figure

        curves = self._curves
        if len(curves) > 8:
            keep = sorted({round(i * (len(curves) - 1) / 7) for i in range(8)})
            curves = [curves[i] for i in keep]
        fig = Figure(figsize=(7, 4), layout="tight")
        ax = fig.subplots()
        cmap = colormaps["viridis"]
        for i, (label, norms) in enumerate(curves):
            ax.semilogy(range(len(norms)), norms.clamp_min(1e-30), color=cmap(i / max(1, len(curves) - 1)),
                        label=label, marker="o" if len(norms) <= 30 else None, markersize=3)
        h = self.hparams
        name = {"rnn": f"vanilla RNN ({h.nonlinearity})", "lstm": "LSTM", "gru": "GRU"}[h.cell]
        ax.set(xlabel="time step t (0 = the token to recall)", ylabel="||dL/dh_t|| (mean over the batch)",
               title=f"{name}, H={h.hidden}: gradient reaching each time step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        return fig
