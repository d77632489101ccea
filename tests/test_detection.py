"""Chapter 3 detection: box maths (IoU, NMS, the YOLO encoding), the YOLO loss, mean average
precision (by hand and against pycocotools), the generated shapes data, and a short learning check."""

from __future__ import annotations

import contextlib
import io
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from litlab.chapters.detection import boxes as bx
from litlab.chapters.detection.module import YoloDetector
from litlab.chapters.detection.nets import YoloLoss, YoloNet
from litlab.config import OptimConfig
from litlab.data.shapes import CLASS_NAMES, ShapesDataModule, make_shapes, unpad
from litlab.errors import ConfigError


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- IoU
def test_iou_hand_computed():
    a = t([0, 0, 10, 10])
    assert bx.box_iou(a, a).item() == 1.0  # identical
    assert bx.box_iou(a, t([20, 20, 30, 30])).item() == 0.0  # disjoint
    assert bx.box_iou(a, t([10, 0, 20, 10])).item() == 0.0  # touching edges: no area in common
    assert bx.box_iou(a, t([0, 0, 10, 5])).item() == 0.5  # half of a: 50 / 100
    assert bx.box_iou(a, t([5, 0, 15, 10])).item() == pytest.approx(1 / 3)  # half-shifted: 50 / (100 + 100 - 50)
    assert bx.box_iou(a, t([5, 5, 15, 15])).item() == pytest.approx(25 / 175)  # quarter: 25 / (200 - 25)
    many = t([0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30])
    m = bx.box_iou(many, many)
    assert m.shape == (3, 3) and torch.allclose(m, m.T) and torch.allclose(m.diag(), torch.ones(3))
    assert torch.allclose(bx.elementwise_iou(many, many.flip(0)), m.flip(1).diag())


# ---------------------------------------------------------------- NMS
def test_nms_keeps_the_right_boxes():
    boxes = t([0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10], [1, 0, 11, 10], [40, 40, 50, 50])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.85, 0.1])
    # 0 is kept; 3 (IoU 9/11 with 0) and 1 (IoU 1/3) are suppressed by it; 2 overlaps only 1 (and 3
    # by 1/19) -> kept although a suppressed box overlapped it: greedy NMS; 4 is alone -> kept.
    assert bx.nms(boxes, scores, 0.3).tolist() == [0, 2, 4]
    assert bx.nms(boxes, scores, 0.9).tolist() == [0, 3, 1, 2, 4]  # nothing overlaps by > 0.9
    # Per class: the same box in another class is never suppressed.
    labels = torch.tensor([0, 0, 0, 1, 0])
    assert bx.batched_nms(boxes, scores, labels, 0.3).tolist() == [0, 3, 2, 4]
    assert bx.batched_nms(boxes[:0], scores[:0], labels[:0], 0.5).numel() == 0


# ---------------------------------------------------------------- encoding
@pytest.mark.parametrize("size", ["sqrt", "log"])
def test_encode_decode_round_trip(size):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 2 + torch.rand(200, 2, generator=g) * 14], 1)  # inside 64 x 64
    i, j = bx.box_cell(boxes, stride=8, grid=8)
    prior = 16.0
    code = bx.encode(boxes, i, j, 8, 64, size, prior)
    assert ((code[:, :2] >= 0) & (code[:, :2] < 1)).all()  # the centre lies in its own cell
    assert torch.allclose(bx.decode(code, i, j, 8, 64, size, prior), boxes, atol=1e-4)
    # a box centred at (20, 36) with w = 16 lies in cell (row 4, column 2) at offsets (0.5, 0.5)
    b = t([12, 28, 28, 44])
    ci, cj = bx.box_cell(b, 8, 8)
    assert (ci.item(), cj.item()) == (4, 2)
    expect = [0.5, 0.5, 0.5, 0.5] if size == "sqrt" else [0.5, 0.5, 0.0, 0.0]  # sqrt(16/64), log(16/16)
    assert bx.encode(b, ci, cj, 8, 64, size, prior)[0].tolist() == expect


# ---------------------------------------------------------------- the YOLO loss
def perfect_output(net: YoloNet, targets: torch.Tensor, big: float = 30.0) -> torch.Tensor:
    """The raw output (B, G, G, A*5 + C) that decodes exactly to `targets`: predictor 0 of each
    object's cell holds its box with objectness +big and the class logit +big; every other predictor
    is a tiny box with objectness -big."""
    B, G, A, C = len(targets), net.grid, net.A, net.num_classes
    out = torch.zeros(B, G, G, A, 5)
    out[..., 2:4] = -20.0 if net.size == "log" else 0.0  # size ~ 0: no overlap with anything
    out[..., 4] = -big
    cls = torch.zeros(B, G, G, C)
    for b, (boxes, labels) in enumerate(unpad(targets)):
        i, j = bx.box_cell(boxes, net.stride, net.grid)
        code = bx.encode(boxes, i, j, net.stride, net.image_size, net.size, net.priors[0])
        xy = code[:, :2].clamp(1e-6, 1 - 1e-6)
        out[b, i, j, 0, :2] = torch.log(xy / (1 - xy))  # sigmoid^-1
        out[b, i, j, 0, 2:4] = code[:, 2:]
        out[b, i, j, 0, 4] = big
        cls[b, i, j, labels] = big
    return torch.cat([out.flatten(3), cls], -1)


@pytest.mark.parametrize("form", ["sse", "logistic"])
@pytest.mark.parametrize("size,A", [("sqrt", 1), ("log", 2)])
def test_loss_is_zero_for_a_perfect_prediction_and_positive_otherwise(form, size, A):
    targets = make_shapes(6, seed=1)["targets"]
    net = YoloNet(3, 64, 3, boxes_per_cell=A, widths=[4, 4, 4], head_width=4, size=size)
    loss = YoloLoss(5.0, 0.5, form)
    out = perfect_output(net, targets)
    parts = loss(net, out, targets)
    assert set(parts) == {"loss", "coord", "obj", "noobj", "cls"}
    assert parts["loss"].item() < 1e-6, parts
    for k, bad in (("coord", (0, 0)), ("obj", 4), ("cls", -1)):  # spoil one thing at a time
        spoilt = out.clone()
        b0 = 0
        i, j = bx.box_cell(targets[0, :1, :4], net.stride, net.grid)
        if k == "cls":
            spoilt[b0, i, j, A * 5:] = spoilt[b0, i, j, A * 5:].roll(1, -1)  # the wrong class
        elif k == "obj":
            spoilt[b0, i, j, 4] = -30.0  # "no object" where there is one
        else:
            spoilt[b0, i, j, 0] += 2.0  # centre moved within the cell
        p = loss(net, spoilt, targets)
        assert p[k].item() > 0.01 and p["loss"].item() > 0.01, (k, p)
    # A confident object in an empty cell is punished by the noobj term.
    empty = torch.ones(net.grid, net.grid, dtype=torch.bool)
    for box in targets[0][targets[0][:, 4] >= 0, :4]:
        i, j = bx.box_cell(box, net.stride, net.grid)
        empty[i, j] = False
    ei, ej = empty.nonzero()[0]
    spoilt = out.clone()
    spoilt[0, ei, ej, 4] = 30.0
    assert loss(net, spoilt, targets)["noobj"].item() > 0.05  # sse: lambda_noobj * 1^2 / 6 images


def loss_object_by_object(net: YoloNet, out: torch.Tensor, targets: torch.Tensor, form: str, l_coord: float,
                          l_noobj: float) -> dict[str, float]:
    """Eq. 3 of the YOLO paper summed in Python, one image and one object at a time."""
    import torch.nn.functional as F

    code, obj_logit, cls_logit = net.split(out.float())
    pred = net.decode(code)
    total = dict.fromkeys(("coord", "obj", "noobj", "cls"), 0.0)
    for b, (boxes, labels) in enumerate(unpad(targets)):
        responsible = torch.zeros(obj_logit.shape[1:], dtype=torch.bool)
        for box, label in zip(boxes, labels):
            i, j = (int(v) for v in bx.box_cell(box, net.stride, net.grid))
            ious = torch.stack([bx.elementwise_iou(pred[b, i, j, a], box) for a in range(net.A)])
            a = int(ious.argmax())
            responsible[i, j, a] = True
            target = bx.encode(box, torch.tensor(i), torch.tensor(j), net.stride, net.image_size, net.size,
                               net.priors[a])
            total["coord"] += l_coord * float(((code[b, i, j, a] - target) ** 2).sum())
            logit, cls = obj_logit[b, i, j, a], cls_logit[b, i, j]
            if form == "sse":
                total["obj"] += float((logit.sigmoid() - ious[a]) ** 2)
                total["cls"] += float(((cls.softmax(-1) - F.one_hot(label.long(), net.num_classes)) ** 2).sum())
            else:
                total["obj"] += float(F.softplus(-logit))  # -log sigmoid(t_o)
                total["cls"] += float(F.cross_entropy(cls, label.long()))
        empty = obj_logit[b][~responsible]
        total["noobj"] += l_noobj * float((empty.sigmoid() ** 2).sum() if form == "sse" else F.softplus(empty).sum())
    n = len(targets)
    return {k: v / n for k, v in total.items()}


@pytest.mark.parametrize("form", ["sse", "logistic"])
@pytest.mark.parametrize("size,A", [("sqrt", 1), ("log", 3)])
def test_loss_equals_the_paper_summed_object_by_object(form, size, A):
    """The loss scores every padded target slot (empty ones with weight 0) so that no tensor is
    sized by the number of objects; it must equal eq. 3 summed over the real objects alone."""
    targets = make_shapes(5, seed=3, min_objects=0, max_objects=4)["targets"]
    assert (targets[..., 4] < 0).any() and (targets[..., 4] >= 0).any()  # empty slots, real objects
    net = YoloNet(3, 64, 3, boxes_per_cell=A, widths=[4, 4, 4], head_width=4, size=size)
    out = torch.randn(5, net.grid, net.grid, A * 5 + 3, generator=torch.Generator().manual_seed(0))
    parts = YoloLoss(5.0, 0.5, form)(net, out, targets)
    expected = loss_object_by_object(net, out, targets, form, 5.0, 0.5)
    for k, v in expected.items():
        assert math.isclose(parts[k].item(), v, rel_tol=1e-5, abs_tol=1e-6), (k, parts[k].item(), v)
    assert math.isclose(parts["loss"].item(), sum(expected.values()), rel_tol=1e-5)


# ---------------------------------------------------------------- mean average precision
def test_map_by_hand():
    gt = [{"boxes": t([0, 0, 10, 10]), "labels": torch.tensor([0])}]
    perfect = [{"boxes": t([0, 0, 10, 10]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    m = bx.MeanAP()
    m.update(perfect, gt)
    assert {k: v.item() for k, v in m.compute().items()} == {"map": 1.0, "map_50": 1.0, "map_75": 1.0}
    # A false positive ranked above the true positive: precision 1/2 at recall 1 -> AP = 0.5.
    m = bx.MeanAP()
    m.update([{"boxes": t([50, 50, 60, 60], [0, 0, 10, 10]), "scores": torch.tensor([0.9, 0.8]),
               "labels": torch.tensor([0, 0])}], gt)
    assert m.compute()["map_50"].item() == pytest.approx(0.5)
    # IoU 0.6 counts at 0.5..0.6 only (3 of the 10 thresholds); a wrong label never counts.
    m = bx.MeanAP()
    m.update([{"boxes": t([0, 0, 10, 6], [0, 0, 10, 10]), "scores": torch.tensor([0.9, 0.8]),
               "labels": torch.tensor([0, 1])}], gt)
    r = m.compute()
    assert r["map_50"].item() == 1.0 and r["map"].item() == pytest.approx(0.3) and r["map_75"].item() == 0.0


def xywh(b):
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def test_map_agrees_with_pycocotools():
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    g = torch.Generator().manual_seed(0)
    preds, targets, images, anns, dets = [], [], [], [], []
    for img in range(30):
        n = int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 40
        gt = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 20], 1).round()
        gl = torch.randint(0, 3, (n,), generator=g)
        k = int(torch.randint(0, 6, (1,), generator=g))
        idx = torch.randint(0, n, (k,), generator=g)
        pb = gt[idx] + torch.randn(k, 4, generator=g) * 3
        pb[:, 2:] = torch.maximum(pb[:, 2:], pb[:, :2] + 1)
        pl = torch.where(torch.rand(k, generator=g) < 0.8, gl[idx], torch.randint(0, 3, (k,), generator=g))
        ps = torch.rand(k, generator=g)
        preds.append({"boxes": pb, "scores": ps, "labels": pl})
        targets.append({"boxes": gt, "labels": gl})
        images.append({"id": img})
        for b, lab in zip(gt.tolist(), gl.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": lab, "bbox": xywh(b),
                         "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0})
        for b, s, lab in zip(pb.tolist(), ps.tolist(), pl.tolist()):
            dets.append({"image_id": img, "category_id": lab, "bbox": xywh(b), "score": s})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in range(3)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    m = bx.MeanAP()
    m.update(preds, targets)
    r = m.compute()
    assert 0.05 < ev.stats[0] < 0.95  # a non-trivial case
    assert r["map"].item() == pytest.approx(ev.stats[0], abs=1e-6)
    assert r["map_50"].item() == pytest.approx(ev.stats[1], abs=1e-6)
    assert r["map_75"].item() == pytest.approx(ev.stats[2], abs=1e-6)


# ---------------------------------------------------------------- data
def test_shapes_are_deterministic_and_boxes_match_the_drawn_shapes():
    a, b = make_shapes(50, seed=3), make_shapes(50, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["images"], make_shapes(50, seed=4)["images"])
    # Without noise every pixel of a shape has exactly its colour (up to the uint8 rounding).
    d = make_shapes(200, noise=0.0, seed=5)
    img, tg, colors = d["images"].float() / 255, d["targets"], d["colors"]
    assert img.shape == (200, 3, 64, 64) and tg.shape == (200, 3, 5)
    n_obj = (tg[..., 4] >= 0).sum(1)
    assert n_obj.min() >= 1 and n_obj.max() == 3
    fill = {0: [], 1: [], 2: []}
    for n in range(200):
        valid = tg[n, :, 4] >= 0
        assert (valid[:-1].int() >= valid[1:].int()).all() and (tg[n, ~valid] == -1).all()  # objects, then padding
        for k in valid.nonzero()[:, 0].tolist():
            x1, y1, x2, y2, lab = tg[n, k].long().tolist()
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64 and 10 <= x2 - x1 <= 24
            c = (colors[n, k] * 255).round() / 255
            is_c = ((img[n] - c[:, None, None]).abs() < 1e-3).all(0)  # (64, 64)
            # Around the box (1-pixel margin) the pixels of that colour have exactly this bounding box.
            win = is_c[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1]
            rows, cols = win.any(1).nonzero()[:, 0], win.any(0).nonzero()[:, 0]
            oy, ox = max(y1 - 1, 0), max(x1 - 1, 0)
            assert [cols.min() + ox, rows.min() + oy, cols.max() + ox + 1, rows.max() + oy + 1] == [x1, y1, x2, y2]
            fill[lab].append(is_c[y1:y2, x1:x2].float().mean().item())
    # The label is the shape: a square fills its box, a disc pi/4 of it, a triangle half.
    assert min(fill[0]) == 1.0
    assert all(abs(f - math.pi / 4) < 0.05 for f in fill[1])
    assert all(0.48 < f < 0.58 for f in fill[2])


def test_shapes_datamodule_batches_and_config_errors():
    dm = ShapesDataModule(n_train=40, n_val=8, n_test=8, batch_size=16)
    assert dm.info() == {"input_shape": (3, 64, 64), "num_classes": 3, "class_names": list(CLASS_NAMES)}
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (16, 3, 64, 64) and 0 <= x.min() and x.max() <= 1
    assert y.shape == (16, 3, 5)
    with pytest.raises(ConfigError, match="data.max_size"):
        ShapesDataModule(image_size=32, max_size=24)
    with pytest.raises(ConfigError, match="model.widths"):
        YoloDetector(input_shape=(3, 64, 64), num_classes=3, class_names=list(CLASS_NAMES), widths=[4] * 7)


# ---------------------------------------------------------------- learning + figure
def test_yolo_loss_falls_quickly_and_the_figure_is_logged(tmp_path):
    class FigureLogger(CSVLogger):
        def log_figure(self, figure, artifact_file):
            figures.append((figure, artifact_file))

    figures = []
    L.seed_everything(0, verbose=False)
    dm = ShapesDataModule(n_train=512, n_val=64, n_test=32, batch_size=32)
    model = YoloDetector(**dm.info(), plot_images=4)
    model.optim_config = OptimConfig(name="adam", lr=3e-3)
    dm.setup()
    x, y = dm.val_set.tensors()
    model.eval()
    with torch.no_grad():
        before = model.criterion(model.net, model(x), y)["loss"].item()
    trainer = L.Trainer(max_epochs=8, logger=FigureLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    model.eval()
    with torch.no_grad():
        after = model.criterion(model.net, model(x), y)["loss"].item()
    assert after < 0.25 * before, (before, after)  # measured: 16.0 -> 2.0 in 128 steps (~5 s)
    assert trainer.callback_metrics["val/map_50"] > 0.3  # measured 0.52
    (fig, name), = figures
    assert name == "plots/detections.png"
    fig.savefig(tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 5000
    dets = model.detect(x[:2])
    assert len(dets) == 2 and set(dets[0]) == {"boxes", "scores", "labels"}
    assert ((dets[0]["boxes"] >= 0) & (dets[0]["boxes"] <= 64)).all()


def test_map_metric_is_torchmetrics_where_it_can_run():
    from litlab.chapters.detection.boxes import MeanAP, mean_average_precision

    metric = mean_average_precision()
    try:
        import torchvision  # noqa: F401  (torchmetrics' mAP needs it)
    except Exception:
        assert isinstance(metric, MeanAP)
    else:
        assert type(metric).__name__ == "MeanAveragePrecision"
