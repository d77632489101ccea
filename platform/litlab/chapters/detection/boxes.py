"""Box maths for the detector, in plain torch: IoU, the YOLO box encoding, NMS, and mean average
precision (COCO's definition, checked against pycocotools in tests/test_detection.py).

Boxes are (..., 4) tensors [x1, y1, x2, y2] in pixels (x along the width), x1 <= x2, y1 <= y2.
(torchvision.ops has box_iou / nms and torchmetrics' MeanAveragePrecision needs torchvision; neither
is used: torchvision is not a dependency of litlab.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric


def box_area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU = |A n B| / (|A| + |B| - |A n B|): a (N, 4), b (M, 4) -> (N, M); 0 for empty boxes."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2): top-left of the intersection
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2): bottom-right
    inter = (rb - lt).clamp_min(0).prod(-1)  # (N, M)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def elementwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching boxes: a, b (..., 4) -> (...)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    union = box_area(a) + box_area(b) - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


# ---------------------------------------------------------------- YOLO encoding
# The image is cut into a G x G grid of cells of `stride` pixels. A box with centre (cx, cy) and size
# (w, h) belongs to the cell (i, j) = (floor(cy / stride), floor(cx / stride)) holding its centre,
# and is written relative to that cell:
#     x = cx / stride - j,  y = cy / stride - i     in [0, 1): offsets inside the cell (YOLO v1/v2)
#     size "sqrt" (v1): w' = sqrt(w / S), h' = sqrt(h / S)    (S = image side: a small error on a
#                       small box costs more than on a large one)
#     size "log"  (v2): w' = log(w / p_w), h' = log(h / p_h)  (p = the predictor's prior, in pixels)
# The network predicts t_x, t_y, t_w, t_h and we read x = sigmoid(t_x), y = sigmoid(t_y) (so the
# centre stays in its cell), w' = t_w, h' = t_h.
def box_cell(boxes: Tensor, stride: float, grid: int) -> tuple[Tensor, Tensor]:
    """Row i and column j (long, (...)) of the cell that holds each box centre."""
    cx = (boxes[..., 0] + boxes[..., 2]) / 2
    cy = (boxes[..., 1] + boxes[..., 3]) / 2
    j = (cx / stride).floor().long().clamp(0, grid - 1)
    i = (cy / stride).floor().long().clamp(0, grid - 1)
    return i, j


def encode(boxes: Tensor, i: Tensor, j: Tensor, stride: float, image_size: float, size: str,
           prior: Tensor | float = 1.0) -> Tensor:
    """xyxy pixel boxes (..., 4) in cells (i, j) -> (..., 4) [x, y, w', h'] as above."""
    cx = (boxes[..., 0] + boxes[..., 2]) / 2
    cy = (boxes[..., 1] + boxes[..., 3]) / 2
    w = (boxes[..., 2] - boxes[..., 0]).clamp_min(1e-6)
    h = (boxes[..., 3] - boxes[..., 1]).clamp_min(1e-6)
    x, y = cx / stride - j, cy / stride - i
    if size == "sqrt":
        tw, th = (w / image_size).sqrt(), (h / image_size).sqrt()
    else:
        tw, th = (w / prior).log(), (h / prior).log()
    return torch.stack([x, y, tw, th], -1)


def decode(code: Tensor, i: Tensor, j: Tensor, stride: float, image_size: float, size: str,
           prior: Tensor | float = 1.0) -> Tensor:
    """Inverse of `encode`: (..., 4) [x, y, w', h'] in cells (i, j) -> xyxy pixel boxes (..., 4)."""
    cx, cy = (code[..., 0] + j) * stride, (code[..., 1] + i) * stride
    if size == "sqrt":
        w, h = code[..., 2].clamp_min(0) ** 2 * image_size, code[..., 3].clamp_min(0) ** 2 * image_size
    else:
        w, h = code[..., 2].clamp(max=10).exp() * prior, code[..., 3].clamp(max=10).exp() * prior
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


# ---------------------------------------------------------------- non-maximum suppression
def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS: repeatedly keep the highest-scoring box left and drop every remaining box with
    IoU > iou_threshold with it. boxes (N, 4), scores (N,) -> indices kept (long), best first."""
    order = scores.argsort(descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])  # (N, N) in score order
    removed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for k in range(len(order)):
        if removed[k]:
            continue
        keep.append(k)
        removed |= iou[k] > iou_threshold  # (removes k itself too: it is kept already)
    return order[torch.tensor(keep, dtype=torch.long)]


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each class only: shift every class's boxes by its own offset so boxes of
    different classes never overlap, then one NMS."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    offset = labels.to(boxes) * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset[:, None], scores, iou_threshold)


# ---------------------------------------------------------------- mean average precision
class MeanAP(Metric):
    """COCO-style mean average precision over classes, for IoU thresholds 0.5:0.05:0.95 (`map`)
    and 0.5 (`map_50`), all box sizes, at most `max_detections` per image and class (COCO's maxDets=100).

    Per class and IoU threshold t: detections of all images sorted by score; each one, in that
    order, matches the unmatched ground-truth box of its image and class with the highest IoU >= t
    (a true positive), else it is a false positive. AP = mean over recall levels r in {0, 0.01,
    ..., 1} of the interpolated precision max_{r' >= r} p(r') (0 beyond the last recall reached).
    Classes without ground truth are left out of the mean. update() takes lists (one per image) of
    {"boxes", "scores", "labels"} and {"boxes", "labels"}, like torchmetrics' MeanAveragePrecision.
    """

    full_state_update = False

    def __init__(self, max_detections: int = 100, **kwargs):
        super().__init__(**kwargs)
        self.max_detections = max_detections
        # The exact floats pycocotools uses (np.linspace), so that ties at a threshold agree.
        self.iou_thresholds = torch.from_numpy(np.linspace(0.5, 0.95, 10))
        self.recall_levels = torch.from_numpy(np.linspace(0.0, 1.0, 101))
        for name in ("det_boxes", "det_scores", "det_labels", "gt_boxes", "gt_labels"):
            self.add_state(name, default=[], dist_reduce_fx=None)  # one tensor per image

    def update(self, preds: list[dict[str, Tensor]], target: list[dict[str, Tensor]]) -> None:
        for p, t in zip(preds, target, strict=True):
            top = p["scores"].argsort(descending=True, stable=True)
            self.det_boxes.append(p["boxes"][top].detach().reshape(-1, 4).double())
            self.det_scores.append(p["scores"][top].detach().double())
            self.det_labels.append(p["labels"][top].detach().long())
            self.gt_boxes.append(t["boxes"].detach().reshape(-1, 4).double())
            self.gt_labels.append(t["labels"].detach().long())

    def compute(self) -> dict[str, Tensor]:
        T = len(self.iou_thresholds)
        # Many small ops follow: on the CPU (states are already gathered across processes here).
        db, ds, dl, gb, gl = ([x.cpu() for x in state] for state in (
            self.det_boxes, self.det_scores, self.det_labels, self.gt_boxes, self.gt_labels))
        classes = torch.cat(gl).unique().tolist() if gl else []
        ap = torch.zeros(len(classes), T, dtype=torch.float64)
        for c_idx, c in enumerate(classes):
            scores, tps, n_gt = [], [], 0
            for img in range(len(gb)):
                d_mask, g_mask = dl[img] == c, gl[img] == c
                boxes, s = db[img][d_mask][: self.max_detections], ds[img][d_mask][: self.max_detections]
                gts = gb[img][g_mask]
                n_gt += len(gts)
                if len(s) == 0:
                    continue
                # Greedy matching in score order, for all thresholds at once: (D, T) true positives.
                iou = box_iou(boxes, gts)  # (D, G), rows already sorted by score
                matched = torch.zeros(T, len(gts), dtype=torch.bool)
                tp = torch.zeros(len(s), T, dtype=torch.bool)
                for d in range(len(s)):
                    if len(gts) == 0:
                        break
                    cand = torch.where(matched, -1.0, iou[d].expand(T, -1))  # (T, G)
                    best, g = cand.max(1)  # (T,)
                    hit = best >= self.iou_thresholds
                    tp[d] = hit
                    matched[hit.nonzero()[:, 0], g[hit]] = True
                scores.append(s)
                tps.append(tp)
            if not scores or n_gt == 0:
                continue  # no detections: AP 0 (a class with no ground truth is not in `classes`)
            s, tp = torch.cat(scores), torch.cat(tps)
            order = s.argsort(descending=True, stable=True)
            tp = tp[order].double()  # (D, T)
            ctp, cfp = tp.cumsum(0), (1 - tp).cumsum(0)
            recall, precision = ctp / n_gt, ctp / (ctp + cfp)
            precision = precision.flip(0).cummax(0).values.flip(0)  # envelope: max over recall >= r
            for t in range(T):
                idx = torch.searchsorted(recall[:, t].contiguous(), self.recall_levels)  # first recall >= r
                p = torch.cat([precision[:, t], precision.new_zeros(1)])[idx]
                ap[c_idx, t] = p.mean()
        if not classes:
            return {"map": torch.tensor(-1.0), "map_50": torch.tensor(-1.0), "map_75": torch.tensor(-1.0)}
        per_t = ap.mean(0).float()  # (T,)
        return {"map": per_t.mean(), "map_50": per_t[0], "map_75": per_t[5]}


def mean_average_precision(max_detections: int = 100) -> Metric:
    """torchmetrics' MeanAveragePrecision where it can run (it needs torchvision), else MeanAP
    above: the same definition and interface, checked against pycocotools to 1e-6. Both return
    map, map_50 and map_75."""
    try:
        from torchmetrics.detection import MeanAveragePrecision

        return MeanAveragePrecision(box_format="xyxy", iou_type="bbox",
                                    max_detection_thresholds=[1, 10, max_detections])
    except (ImportError, ModuleNotFoundError, RuntimeError):
        return MeanAP(max_detections)
