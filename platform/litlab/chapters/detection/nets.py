"""Chapter 3 detection as plain nn.Modules (no Lightning): a small YOLO and its loss.

YOLO (Redmon et al. 2016) reads detection as one regression: a conv net maps the image to a G x G
grid and every cell predicts, for each of its A box predictors, a box and an objectness, plus one
class distribution for the cell:

    (B, 3, S, S) -> backbone (stride s = 2^len(widths)) -> (B, A*5 + C, G, G),  G = S / s
    per cell and predictor a: t_x, t_y, t_w, t_h (the box, encoded as in boxes.py), t_o (objectness)
    per cell: C class logits

Decoding: box = decode(sigmoid(t_x), sigmoid(t_y), t_w, t_h), confidence for class c =
sigmoid(t_o) * softmax(class logits)_c (v1's Pr(object) * Pr(class | object)).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litlab.chapters.detection import boxes as bx


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """conv -> BN -> leaky ReLU(0.1), YOLO's unit (the conv has no bias: BN has its own shift)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, inplace=True))


class YoloNet(nn.Module):
    """Backbone: one stride-2 conv_bn per entry of `widths` (each halves H and W), then one 3x3
    conv_bn of `head_width` at the grid's resolution and a 1x1 conv to A*5 + C outputs per cell.

    forward: (B, C_in, S, S) -> (B, G, G, A*5 + C), channels last: [A x (t_x, t_y, t_w, t_h, t_o),
    C class logits]. `priors` (A,) are the box priors in pixels for size="log" (geometric between
    stride and 4 * stride; unused for "sqrt")."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, boxes_per_cell: int = 1,
                 widths: tuple[int, ...] | list[int] = (16, 32, 64), head_width: int = 64,
                 size: Literal["sqrt", "log"] = "sqrt"):
        super().__init__()
        self.num_classes, self.A, self.size, self.image_size = num_classes, boxes_per_cell, size, image_size
        self.stride = 2 ** len(widths)
        if image_size % self.stride:
            raise ValueError(f"image side {image_size} is not a multiple of the stride {self.stride}")
        self.grid = image_size // self.stride
        layers, c = [], in_channels
        for w in widths:  # (B, c, H, W) -> (B, w, H/2, W/2)
            layers.append(conv_bn(c, w, 3, stride=2))
            c = w
        self.backbone = nn.Sequential(*layers, conv_bn(c, head_width, 3))  # (B, head_width, G, G)
        self.head = nn.Conv2d(head_width, boxes_per_cell * 5 + num_classes, 1)  # (B, A*5 + C, G, G)
        self.register_buffer("priors", self.stride * 4.0 ** torch.linspace(0, 1, boxes_per_cell), persistent=False)
        with torch.no_grad():  # start with objectness ~ 0.01 everywhere (most cells are empty)
            bias = self.head.bias.view(-1)
            bias[4:boxes_per_cell * 5:5] = -math.log(99.0)
            if size == "sqrt":  # ... and boxes ~ a quarter of the image side
                bias[2:boxes_per_cell * 5:5] = bias[3:boxes_per_cell * 5:5] = 0.5

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x)).permute(0, 2, 3, 1)  # (B, G, G, A*5 + C)

    def split(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, G, G, A*5 + C) -> box codes (B, G, G, A, 4) with x, y squashed by sigmoid,
        objectness logits (B, G, G, A), class logits (B, G, G, C)."""
        B, G, A = out.shape[0], out.shape[1], self.A
        per_box = out[..., : A * 5].reshape(B, G, G, A, 5)
        code = torch.cat([per_box[..., :2].sigmoid(), per_box[..., 2:4]], -1)
        return code, per_box[..., 4], out[..., A * 5:]

    def cell_index(self, device=None) -> tuple[Tensor, Tensor]:
        """Row i and column j of every (cell, predictor): each (G, G, 1) long, broadcasting over A."""
        ar = torch.arange(self.grid, device=device)
        return ar[:, None, None].expand(-1, self.grid, 1), ar[None, :, None].expand(self.grid, -1, 1)

    def decode(self, code: Tensor) -> Tensor:
        """Box codes (B, G, G, A, 4) -> xyxy pixel boxes (B, G, G, A, 4)."""
        i, j = self.cell_index(code.device)
        return bx.decode(code, i, j, self.stride, self.image_size, self.size, self.priors)

    @torch.no_grad()
    def detect(self, out: Tensor, conf_threshold: float = 0.01, iou_threshold: float = 0.5,
               max_detections: int = 100) -> list[dict[str, Tensor]]:
        """Network output (B, G, G, A*5 + C) -> per image {"boxes" (n, 4), "scores" (n,), "labels" (n,)}:
        each predictor keeps its best class (score sigmoid(t_o) * p(c)), boxes are clipped to the
        image, those with score < conf_threshold dropped, then NMS per class, best `max_detections`."""
        code, obj, cls = self.split(out.float())
        boxes = self.decode(code).clamp(0, self.image_size).flatten(1, 3)  # (B, G*G*A, 4)
        p_cls = cls.softmax(-1)[:, :, :, None, :]  # (B, G, G, 1, C): one distribution per cell
        scores, labels = (obj.sigmoid()[..., None] * p_cls).max(-1)  # (B, G, G, A) each
        scores, labels = scores.flatten(1), labels.flatten(1)  # (B, G*G*A)
        results = []
        for b in range(out.shape[0]):
            keep = scores[b] >= conf_threshold
            bb, ss, ll = boxes[b][keep], scores[b][keep], labels[b][keep]
            k = bx.batched_nms(bb.cpu(), ss.cpu(), ll.cpu(), iou_threshold)[:max_detections].to(bb.device)
            results.append({"boxes": bb[k], "scores": ss[k], "labels": ll[k]})
        return results


class YoloLoss(nn.Module):
    """The YOLO v1 loss (Redmon et al. 2016, eq. 3), per image, averaged over the batch:

      lambda_coord sum_ij 1obj_ij [(x - x^)^2 + (y - y^)^2 + (w' - w'^)^2 + (h' - h'^)^2]   coord
    +              sum_ij 1obj_ij (C_ij - C^_ij)^2                                          obj
    + lambda_noobj sum_ij 1noobj_ij (C_ij - C^_ij)^2                                        noobj
    +              sum_i  1obj_i sum_c (p_i(c) - p^_i(c))^2                                 cls

    i: cell, j: predictor. 1obj_i: an object's centre is in cell i; 1obj_ij: predictor j of that
    cell is "responsible" for it (the one whose predicted box has the highest IoU with it);
    1noobj_ij = 1 - 1obj_ij. w', h' are sqrt sizes (v1) or log sizes (v2), see boxes.py. The target
    confidence of a responsible predictor is C = IoU(predicted box, truth) (detached), 0 elsewhere.
    With form="logistic" the two confidence terms are binary cross-entropies on t_o with target 1 /
    0 and the class term is the cross-entropy (as in later YOLOs), which trains faster.
    lambda_noobj < 1 because most cells are empty: without it their gradient swamps the few objects.
    If two objects fall in the same cell, each adds its own terms (this data never has it).
    """

    def __init__(self, lambda_coord: float = 5.0, lambda_noobj: float = 0.5, form: Literal["sse", "logistic"] = "sse"):
        super().__init__()
        self.lambda_coord, self.lambda_noobj, self.form = lambda_coord, lambda_noobj, form

    def forward(self, net: YoloNet, out: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """net: the YoloNet that produced out (its grid and box encoding); out (B, G, G, A*5 + C);
        targets (B, M, 5) padded [x1, y1, x2, y2, label], -1 rows empty.
        Returns {"loss", "coord", "obj", "noobj", "cls"}, each a scalar."""
        B = out.shape[0]
        code, obj_logit, cls_logit = net.split(out.float())  # (B,G,G,A,4), (B,G,G,A), (B,G,G,C)
        pred_boxes = net.decode(code)  # (B, G, G, A, 4)

        # Every target slot (B, M) is scored, an empty one with weight 0 at a stand-in box in cell
        # (0, 0): selecting only the real objects would size the tensors from the values, which on a
        # GPU means waiting for the device at every step.
        weight = (targets[..., 4] >= 0).to(code.dtype)  # (B, M): 1 per real object
        # the stand-in box [0, 0, stride, stride], filled on the device (new_tensor would copy it over)
        stand_in = torch.cat([targets.new_zeros(2), targets.new_full((2,), float(net.stride))])
        gt = torch.where(weight[..., None] > 0, targets[..., :4], stand_in)  # (B, M, 4)
        label = targets[..., 4].clamp_min(0).long()  # (B, M)
        gi, gj = bx.box_cell(gt, net.stride, net.grid)  # (B, M) cell row / column
        b_idx = torch.arange(B, device=out.device)[:, None].expand_as(gi)  # (B, M)
        # Responsible predictor: highest IoU between the cell's A predicted boxes and the truth.
        ious = bx.elementwise_iou(pred_boxes[b_idx, gi, gj], gt[..., None, :])  # (B, M, A)
        best_iou, ga = ious.detach().max(-1)  # (B, M)

        # 1obj_ij (B,G,G,A): weights summed per predictor, so an empty slot adds nothing where it points.
        # A scatter over the flat index: index_put_(accumulate=True) would read the indices' range
        # back from a GPU (.item() of their max and min) at every step.
        G, A = net.grid, net.A
        flat = ((b_idx * G + gi) * G + gj) * A + ga  # (B, M) into (B*G*G*A,)
        resp = obj_logit.new_zeros(obj_logit.numel()).scatter_add_(0, flat.flatten(), weight.flatten())
        resp = resp.view(obj_logit.shape) > 0
        t_code = bx.encode(gt, gi, gj, net.stride, net.image_size, net.size, net.priors[ga])  # (B, M, 4)

        # coord: squared error on (x, y, w', h') of the responsible predictors only.
        coord = (((code[b_idx, gi, gj, ga] - t_code) ** 2).sum(-1) * weight).sum()
        noobj_mask = (~resp).to(code.dtype)  # 1noobj_ij
        logit_obj = obj_logit[b_idx, gi, gj, ga]  # (B, M)
        cls_obj = cls_logit[b_idx, gi, gj]  # (B, M, C): the cells holding an object
        if self.form == "sse":
            conf = obj_logit.sigmoid()
            obj = (((conf[b_idx, gi, gj, ga] - best_iou) ** 2) * weight).sum()  # target C = IoU(pred, truth)
            noobj = (conf ** 2 * noobj_mask).sum()  # target C = 0
            one_hot = torch.zeros_like(cls_obj).scatter_(-1, label[..., None], 1.0)  # (B, M, C), no read of max
            cls = (((cls_obj.softmax(-1) - one_hot) ** 2).sum(-1) * weight).sum()
        else:
            bce = F.binary_cross_entropy_with_logits
            obj = (bce(logit_obj, torch.ones_like(logit_obj), reduction="none") * weight).sum()
            noobj = (bce(obj_logit, torch.zeros_like(obj_logit), reduction="none") * noobj_mask).sum()
            cls = (F.cross_entropy(cls_obj.flatten(0, 1), label.flatten(), reduction="none") * weight.flatten()).sum()
        parts = {"coord": self.lambda_coord * coord / B, "obj": obj / B, "noobj": self.lambda_noobj * noobj / B,
                 "cls": cls / B}
        parts["loss"] = parts["coord"] + parts["obj"] + parts["noobj"] + parts["cls"]
        return parts
