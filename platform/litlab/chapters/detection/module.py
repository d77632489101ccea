"""Chapter 3 detection LightningModule: the registered `yolo` single-shot detector.

Batches are (images (B, 3, S, S), targets (B, M, 5)) with targets padded by -1 rows (see
litlab.data.shapes). Logged: train/loss (per step and epoch) and its parts train/loss_coord,
train/loss_obj, train/loss_noobj, train/loss_cls; the same for val/ and test/; val/map_50 and
val/map every validation, test/map_50, test/map, test/map_75 (COCO mAP: torchmetrics'
MeanAveragePrecision where torchvision is installed, else boxes.MeanAP, its checked twin). Figures:
plots/detections.png (sample validation images, truth vs predictions) at the end of fit, and
plots/detections_epochNNN.png every `plot_every_n_epochs` epochs.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from litlab.chapters.detection.boxes import mean_average_precision
from litlab.chapters.detection.nets import YoloLoss, YoloNet
from litlab.data.shapes import unpad
from litlab.errors import ConfigError
from litlab.module import LitlabModule
from litlab.registry import register_model
from litlab.schema import Range

CHAPTER = "3 Convolutional networks"

Side = Annotated[int, Range(ge=1, le=100_000)]
Width = Annotated[int, Range(ge=1, le=4096)]
Weight = Annotated[float, Range(ge=0, le=1e6)]
Fraction = Annotated[float, Range(ge=0, le=1)]


@register_model(
    "yolo",
    chapter=CHAPTER,
    description="YOLO-style single-shot detector: conv grid of box/objectness/class predictions, YOLO loss, NMS, mAP",
    smoke={"model": {"widths": [4, 8, 8], "head_width": 8, "boxes_per_cell": 2},
           "data": {"name": "shapes", "n_train": 16, "n_val": 8, "n_test": 8, "batch_size": 8}},
)
class YoloDetector(LitlabModule):
    def __init__(
        self,
        input_shape: tuple[Side, Side, Side],  # (C, S, S), from the data
        num_classes: Annotated[int, Range(ge=1, le=100_000)],
        class_names: list[str],  # for the plots
        widths: list[Width] = [16, 32, 64],  # noqa: B006  stride-2 convs: grid = S / 2^len(widths)
        head_width: Width = 64,
        boxes_per_cell: Annotated[int, Range(ge=1, le=16)] = 1,  # A box predictors per cell (v1: 2)
        box_size: Literal["sqrt", "log"] = "log",  # v2: log(w / prior); v1: sqrt(w / S)
        loss_form: Literal["sse", "logistic"] = "sse",  # v1 squared errors, or BCE/CE (nets.YoloLoss)
        lambda_coord: Weight = 5.0,
        lambda_noobj: Weight = 0.5,
        conf_threshold: Fraction = 0.01,  # detections below this score are dropped before NMS
        nms_iou: Fraction = 0.5,  # NMS drops a box overlapping a better one of its class by more
        max_detections: Annotated[int, Range(ge=1, le=10_000)] = 100,
        plot_images: Annotated[int, Range(ge=0, le=64)] = 8,  # validation images in the figure
        plot_every_n_epochs: Annotated[int, Range(ge=0, le=100_000)] = 0,  # 0: only at the end of fit
    ):
        super().__init__()
        self.save_hyperparameters()
        c, h, w = input_shape
        stride = 2 ** len(widths)
        if h != w or h % stride:
            raise ConfigError("model.widths", f"{len(widths)} stride-2 convs need a square image whose side is a "
                              f"multiple of {stride}, got {h}x{w}")
        if len(class_names) != num_classes:
            raise ConfigError("model.class_names", f"{len(class_names)} names for {num_classes} classes")
        self.net = YoloNet(c, h, num_classes, boxes_per_cell, list(widths), head_width, box_size)
        self.criterion = YoloLoss(lambda_coord, lambda_noobj, loss_form)
        self.map = torch.nn.ModuleDict({s: mean_average_precision(max_detections) for s in ("val", "test")})
        self._sample = None  # (images, targets, detections) of the first validation batch, on the CPU

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 3, S, S) -> (B, G, G, A*5 + C)

    def detect(self, x: Tensor) -> list[dict[str, Tensor]]:
        """Images (B, 3, S, S) -> per image {"boxes" xyxy pixels, "scores", "labels"} after NMS."""
        hp = self.hparams
        return self.net.detect(self(x), hp.conf_threshold, hp.nms_iou, hp.max_detections)

    def _step(self, batch, stage: str):
        x, targets = batch
        out = self(x)
        parts = self.criterion(self.net, out, targets)
        train = stage == "train"
        self.log(f"{stage}/loss", parts["loss"].detach(), on_step=train, on_epoch=True, prog_bar=True,
                 sync_dist=not train, batch_size=len(x))
        for k in ("coord", "obj", "noobj", "cls"):
            self.log(f"{stage}/loss_{k}", parts[k].detach(), on_step=False, on_epoch=True, sync_dist=not train,
                     batch_size=len(x))
        return out, parts["loss"]

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")[1]

    def _eval_step(self, batch, batch_idx, stage: str):
        out, _ = self._step(batch, stage)
        hp = self.hparams
        dets = self.net.detect(out, hp.conf_threshold, hp.nms_iou, hp.max_detections)
        truth = [{"boxes": b, "labels": lab} for b, lab in unpad(batch[1])]
        self.map[stage].update(dets, truth)
        if stage == "val" and batch_idx == 0 and hp.plot_images:
            n = hp.plot_images
            kept = [{k: v.cpu() for k, v in d.items()} for d in dets[:n]]
            self._sample = (batch[0][:n].cpu(), batch[1][:n].cpu(), kept)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    def _log_map(self, stage: str, keys: tuple[str, ...]):
        result = self.map[stage].compute()  # synced across processes by torchmetrics
        for k in keys:
            self.log(f"{stage}/{k}", result[k], prog_bar=k == "map_50")
        self.map[stage].reset()

    def on_validation_epoch_end(self):
        self._log_map("val", ("map_50", "map"))
        every = self.hparams.plot_every_n_epochs
        epoch = self.current_epoch + 1
        last = self.trainer.max_epochs is not None and epoch >= self.trainer.max_epochs  # on_fit_end plots that one
        if every and not self.trainer.sanity_checking and epoch % every == 0 and not last:
            self._log_sample(f"plots/detections_epoch{epoch:03d}.png", epoch)

    def on_test_epoch_end(self):
        self._log_map("test", ("map_50", "map", "map_75"))

    def on_fit_end(self):
        self._log_sample("plots/detections.png", self.current_epoch)  # epochs completed

    def _log_sample(self, artifact_file: str, epoch: int):
        if self._sample is None or not self.trainer.is_global_zero or not any(
                hasattr(lg, "log_figure") for lg in self.loggers):
            return
        fig = plot_detections(*self._sample, class_names=self.hparams.class_names,
                              title=f"after {epoch} epochs: truth (dashed) vs predictions (score >= 0.3)")
        self.log_figure(fig, artifact_file)

    def predict_step(self, batch, batch_idx):
        return self.detect(batch[0] if isinstance(batch, (tuple, list)) else batch)


def plot_detections(images: Tensor, targets: Tensor, detections: list[dict[str, Tensor]], class_names: list[str],
                    min_score: float = 0.3, title: str = ""):
    """A matplotlib Figure: images (n, 3, S, S) in [0, 1] with their true boxes (white, dashed) and
    the predictions with score >= min_score (one colour per class, label "class score").
    Built with matplotlib.figure.Figure, not pyplot: no global backend is touched."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = len(images)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3 * cols, 3 * rows + 0.4), layout="constrained")
    palette = ["tab:red", "tab:cyan", "tab:orange", "tab:green", "tab:purple", "tab:olive"]
    for k, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        ax.set_axis_off()
        if k >= n:
            continue
        h, w = images.shape[-2:]
        # extent: pixel (row v, column u) covers [u, u+1] x [v, v+1], the box coordinates' convention
        ax.imshow(images[k].float().permute(1, 2, 0).clamp(0, 1).numpy(), extent=(0, w, h, 0))
        for x1, y1, x2, y2, lab in targets[k][targets[k][:, 4] >= 0].tolist():
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", ls="--", lw=1.2))
            ax.text(x1, y2, class_names[int(lab)], color="white", fontsize=7, va="top")
        d = detections[k]
        for (x1, y1, x2, y2), s, lab in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
            if s < min_score:
                continue
            color = palette[lab % len(palette)]
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=color, lw=1.5))
            ax.text(x1, y1, f"{class_names[lab]} {s:.2f}", color=color, fontsize=7, va="bottom",
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
