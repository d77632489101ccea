"""Chapter 1-2 LightningModules: `mlp` (backprop classifier with L1/L2), `perceptron` (Rosenblatt's
rule, no gradients) and `uat` (one sigmoid layer fitting a 1-D function)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from litlab.chapters.mlp.nets import MLP, Perceptron, SigmoidNet, flat_size
from litlab.errors import ConfigError
from litlab.module import ClassifierModule, LitlabModule
from litlab.registry import register_model
from litlab.schema import Range

CHAPTER = "1-2 MLPs and optimisation"
PosInt = Annotated[int, Range(ge=1)]
NonNeg = Annotated[float, Range(ge=0)]


@register_model(
    "mlp",
    chapter=CHAPTER,
    description="Multi-layer perceptron classifier: depth, width, activation, dropout, norm, L1/L2",
    smoke={"model": {"hidden": [16], "norm": "batch", "dropout": 0.1, "l1": 1e-5, "l2": 1e-4},
           "data": {"name": "digits"}},
)
class MLPClassifier(ClassifierModule):
    """MLP trained by backprop on cross-entropy + l1 * sum|W| + (l2 / 2) * sum W^2.

    The penalties act on the Linear weight matrices only (not biases, not norm parameters). With
    plain SGD, the l2 term's gradient l2 * W is exactly optim.weight_decay = l2 (on the same weights).
    input_shape and num_classes are filled from the data's info() when left out.
    width and depth (set both or neither) replace `hidden` by a uniform [width] * depth, so that a
    sweep can vary the two independently.
    """

    def __init__(
        self,
        input_shape: list[PosInt],
        num_classes: Annotated[int, Range(ge=2)],
        hidden: list[PosInt] = [128, 64],  # noqa: B006 (the signature is the config schema; copied below)
        activation: Literal["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu"] = "relu",
        dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0,
        norm: Literal["none", "batch", "layer"] = "none",
        l1: NonNeg = 0.0,
        l2: NonNeg = 0.0,
        width: Annotated[int, Range(ge=1, le=65536)] | None = None,
        depth: Annotated[int, Range(ge=1, le=64)] | None = None,
    ):
        super().__init__(num_classes)
        self.save_hyperparameters()
        self.l1, self.l2 = l1, l2
        if (width is None) != (depth is None):  # a sweep varies both; one alone is a mistake
            missing, given = ("depth", "width") if depth is None else ("width", "depth")
            raise ConfigError(f"model.{missing}", f"is required when model.{given} is set "
                                                  "(hidden = [width] * depth), or leave both unset to use model.hidden")
        if width is not None:
            hidden = [width] * depth
        self.net = MLP(flat_size(input_shape), list(hidden), num_classes, activation, dropout, norm)

    def penalty_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(l1 * sum_W |W|, l2/2 * sum_W W^2) over the weight matrices."""
        ws = self.net.weight_matrices()
        zero = ws[0].new_zeros(())
        l1 = self.l1 * sum(w.abs().sum() for w in ws) if self.l1 else zero
        l2 = 0.5 * self.l2 * sum(w.pow(2).sum() for w in ws) if self.l2 else zero
        return l1, l2

    def penalty(self) -> torch.Tensor | float:
        if not (self.l1 or self.l2):
            return 0.0
        l1, l2 = self.penalty_terms()
        if self._trainer is not None:  # called from training_step: log the terms beside train/loss
            for name, value, coef in (("train/l1", l1, self.l1), ("train/l2", l2, self.l2)):
                if coef:
                    self.log(name, value.detach(), on_step=False, on_epoch=True)
        return l1 + l2


@register_model(
    "perceptron",
    chapter=CHAPTER,
    description="Rosenblatt's perceptron (multi-class: Kesler), trained by its own rule, no backprop",
    smoke={"model": {"lr": 1.0, "mode": "online"}, "data": {"name": "blobs"}},
)
class PerceptronClassifier(ClassifierModule):
    """The perceptron learning rule on each misclassified sample x with label y, prediction y_hat:

        binary (num_classes=2):  w <- w + lr (y - y_hat) x,  b <- b + lr (y - y_hat)
        multi-class (Kesler):    W[y] <- W[y] + lr x,  W[y_hat] <- W[y_hat] - lr x  (same for b)

    mode="online": samples one at a time in loader order (Rosenblatt); "batch": the sum of the
    updates of a batch's mistakes, all computed with the W from the start of the batch.
    If the data are linearly separable, online training makes finitely many mistakes (Novikoff 1962),
    so train/errors (mistakes per epoch) reaches 0.

    No optimiser: configure_optimizers returns None (Lightning warns once and runs).
    train/loss, val/loss and test/loss are the ERROR RATE (1 - accuracy), so that a checkpoint
    monitoring val/loss (mode min) works; the cross-entropy of perceptron scores would be
    meaningless (their scale is arbitrary). Incompatible with gradient clipping,
    accumulate_grad_batches > 1 (manual optimisation), 16-mixed and DDP (nothing needs a gradient).
    """

    def __init__(
        self,
        input_shape: list[PosInt],
        num_classes: Annotated[int, Range(ge=2)],
        lr: Annotated[float, Range(gt=0)] = 1.0,
        mode: Literal["online", "batch"] = "online",
    ):
        super().__init__(num_classes)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.lr, self.mode = lr, mode
        self.net = Perceptron(flat_size(input_shape), num_classes)

    def configure_optimizers(self):
        return None  # Lightning substitutes a placeholder optimiser that does nothing

    def on_fit_start(self):
        if str(self.trainer.precision) == "16-mixed":  # the grad scaler asserts that some gradient exists
            raise ConfigError("trainer.precision", "16-mixed needs gradients; the perceptron has none: "
                                                   "use 32, 64 or bf16-mixed")

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.mode == "online":
            y_hat = self.net.train_online(x, y, self.lr)
        else:
            with torch.no_grad():
                y_hat = self(x).argmax(1)
            self.net.update(x, y, y_hat, self.lr)
        # No-op step of the placeholder optimiser: counts this batch in trainer.global_step, without
        # which ModelCheckpoint never saves (it skips when global_step has not moved) and max_steps fails.
        self.optimizers().step()
        wrong = (y_hat != y).float()  # the predictions made before each sample's own update
        acc = self.metrics["train_acc"]
        acc.update(y_hat, y)
        self.log("train/errors", wrong.sum(), on_step=False, on_epoch=True, reduce_fx="sum", prog_bar=True)
        self.log("train/loss", wrong.mean(), on_step=False, on_epoch=True)  # error rate, as val/loss
        self.log("train/acc", acc, on_step=False, on_epoch=True)

    def _shared_step(self, batch, stage: str):
        x, y = batch
        y_hat = self(x).argmax(1)
        acc = self.metrics[f"{stage}_acc"]
        acc.update(y_hat, y)
        self.log(f"{stage}/loss", (y_hat != y).float().mean(), on_epoch=True, prog_bar=stage == "val",
                 sync_dist=True)  # error rate, see class doc
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val")


@register_model(
    "uat",
    chapter=CHAPTER,
    description="Universal approximation: one hidden layer of sigmoids fitting a 1-D function (MSE)",
    smoke={"model": {"hidden_units": 8}, "data": {"name": "function1d"}},
)
class UATRegressor(LitlabModule):
    """y_hat = W2 sigmoid(W1 x + b1) + b2 fitted by MSE. At the end of fit (rank 0), plots the fit
    against the target over the data range as plots/fit_vs_target.png (input_dim = output_dim = 1):
    the datamodule's `target_fn` if it has one, and the validation points."""

    def __init__(self, input_dim: PosInt, output_dim: PosInt, hidden_units: PosInt = 32):
        super().__init__()
        self.save_hyperparameters()
        self.net = SigmoidNet(input_dim, hidden_units, output_dim)
        self._val_points: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log(f"{stage}/loss", loss.detach() if stage == "train" else loss, on_step=stage == "train",
                 on_epoch=True, prog_bar=stage != "test", sync_dist=stage != "train")
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def on_validation_epoch_start(self):
        self._val_points = []

    def validation_step(self, batch, batch_idx):
        if self.hparams.input_dim == 1 and self.hparams.output_dim == 1:  # kept for the fit plot
            self._val_points.append((batch[0].detach().cpu(), batch[1].detach().cpu()))
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        loss = self._step(batch, "test")
        self.log("test/mse", loss, on_epoch=True, sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    def on_fit_end(self):
        if not self.trainer.is_global_zero or not any(hasattr(lg, "log_figure") for lg in self.loggers):
            return
        fig = self.plot_fit()
        if fig is not None:
            self.log_figure(fig, "plots/fit_vs_target.png")

    @torch.no_grad()
    def plot_fit(self, target_fn=None, x_range: tuple[float, float] | None = None):
        """A matplotlib Figure of the network vs the target (None unless input and output are 1-D).

        x range: `x_range`, else the datamodule's (x_low, x_high), else that of the validation points.
        Built with matplotlib.figure.Figure, not pyplot: no global backend is touched (safe in
        notebooks and headless servers alike)."""
        from matplotlib.figure import Figure

        if self.hparams.input_dim != 1 or self.hparams.output_dim != 1:
            return None
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        target_fn = target_fn or getattr(dm, "target_fn", None)
        if x_range is None and hasattr(dm, "x_low") and hasattr(dm, "x_high"):
            x_range = (dm.x_low, dm.x_high)
        if x_range is None and self._val_points:
            vx = torch.cat([p[0] for p in self._val_points])
            x_range = (vx.min().item(), vx.max().item())
        lo, hi = x_range or (-1.0, 1.0)
        if not lo < hi:
            lo, hi = -1.0, 1.0
        xs = torch.linspace(lo, hi, 500).unsqueeze(1)  # (500, 1)
        was_training = self.training
        self.eval()
        ys = self(xs.to(self.device, self.dtype)).float().cpu()
        self.train(was_training)

        fig = Figure(figsize=(7, 4), layout="tight")
        ax = fig.subplots()
        if target_fn is not None:
            ax.plot(xs.flatten(), torch.as_tensor(target_fn(xs)).flatten(), "k--", lw=2, label="target")
        if self._val_points:
            vx, vy = (torch.cat(t).flatten() for t in zip(*self._val_points))
            ax.scatter(vx, vy, s=8, alpha=0.4, color="tab:gray", label="validation data")
        ax.plot(xs.flatten(), ys.flatten(), color="tab:red", lw=2,
                label=f"network ({self.hparams.hidden_units} sigmoids)")
        ax.set(xlabel="x", ylabel="y", title="Universal approximation: fit vs target")
        ax.legend()
        return fig
