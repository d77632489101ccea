"""Plots every run gets: learning curves read back from the run's own metric history (so a resumed
run's curve covers all of its segments)."""

from __future__ import annotations

from collections import defaultdict


def learning_curves(c, run_id: str, title: str):
    """One panel per quantity (loss, acc, ...), train and val overlaid, x = optimizer step.
    Returns a matplotlib Figure, or None when the run has no train/val metrics yet."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run = c.get_run(run_id)
    panels: dict[str, list[tuple[str, str]]] = defaultdict(list)  # quantity -> [(label, key)]
    for key in sorted(run.data.metrics):
        stage, _, rest = key.partition("/")
        if stage not in ("train", "val") or not rest:
            continue
        if stage == "train" and rest.endswith("_step") and f"train/{rest[:-5]}_epoch" in run.data.metrics:
            continue  # the epoch mean reads better than noisy per-step points when both exist
        quantity = rest.removesuffix("_epoch").removesuffix("_step")
        panels[quantity].append((f"{stage} (epoch mean)" if rest.endswith("_epoch") else stage, key))
    if not panels:
        return None
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6), squeeze=False)
    for ax, (quantity, series) in zip(axes[0], sorted(panels.items())):
        for label, key in series:
            hist = sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)
            ax.plot([m.step for m in hist], [m.value for m in hist], marker="o" if len(hist) < 30 else None,
                    markersize=3, label=label)
        ax.set_title(quantity)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(quantity)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def tile_images(arr, rows: int, cols: int, band: int = 0, fill: float = 1.0):
    """Images (N, H, W) or (N, H, W, 3) -> one mosaic (rows * (H + band + g) - g, cols * (W + g) - g[, 3]),
    g = grid_gap(H): image i at row i // cols, column i % cols, below `band` empty pixel rows (room
    for its label); the gaps and empty cells are `fill` (white)."""
    import numpy as np

    n, h, w = arr.shape[:3]
    g = grid_gap(h)
    out = np.full((rows * (h + band + g) - g, cols * (w + g) - g, *arr.shape[3:]), fill, dtype=np.float32)
    for i in range(min(n, rows * cols)):
        top, left = (i // cols) * (h + band + g) + band, (i % cols) * (w + g)
        out[top:top + h, left:left + w] = arr[i]
    return out


def grid_gap(h: int) -> int:
    return max(1, h // 8)  # pixels between images: 1 for 8x8 digits, 4 for 32x32


def image_grid(images, title: str = "", nrow: int | None = None, labels=None, cmap: str = "gray"):
    """Images (N, C, H, W) or (N, H, W), values in [0, 1] (clipped) -> a matplotlib Figure with the
    images on a grid of `nrow` rows (default: about square), each optionally titled by `labels[i]`.
    Used for sample grids, reconstructions and traversals of the generative chapters.
    One image of the whole grid on one axes: an axes per image made a 64-image grid cost ~3 s."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    arr = images.detach().float().cpu().clamp(0, 1).numpy() if hasattr(images, "detach") else np.clip(images, 0, 1)
    if arr.ndim == 4:
        arr = arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)  # (N, H, W) or (N, H, W, 3)
    n, h, w = arr.shape[:3]
    rows = nrow or max(1, int(np.floor(np.sqrt(n))))
    cols = int(np.ceil(n / rows))
    band = max(2, round(0.3 * h)) if labels is not None else 0  # a label's line above each image
    g = grid_gap(h)
    fig, ax = plt.subplots(figsize=(1.1 * cols, 1.1 * rows * (h + band + g) / (h + g) + (0.4 if title else 0)))
    ax.imshow(tile_images(arr, rows, cols, band), cmap=cmap if arr.ndim == 3 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.axis("off")
    if labels is not None:
        for i in range(min(n, rows * cols)):
            x = (i % cols) * (w + g) + (w - 1) / 2
            y = (i // cols) * (h + band + g) + band - 0.5  # the band's bottom edge, just above the image
            ax.text(x, y, str(labels[i]), ha="center", va="bottom", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_matrix_figure(matrix, names: list[str] | None = None, title: str = "confusion matrix"):
    """Confusion matrix C[true, predicted] (K, K) of counts -> a matplotlib Figure. Colour: the
    fraction of each true class (row-normalised, so rare classes read as well as common ones);
    text: the counts (K <= 20); tick labels: `names` (K <= 40); the title adds accuracy and n."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    cm = matrix.detach().cpu().numpy() if hasattr(matrix, "detach") else np.asarray(matrix)
    cm = cm.astype(np.int64)
    k = cm.shape[0]
    names = [str(n) for n in names] if names is not None and len(names) == k else [str(i) for i in range(k)]
    total = int(cm.sum())
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)  # recall per true class
    side = min(3.5 + 0.45 * k, 14)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 40:
        ax.set_xticks(range(k), names, rotation=45 if max(map(len, names)) > 3 else 0, ha="right" if
                      max(map(len, names)) > 3 else "center", fontsize=8 if k > 15 else 10)
        ax.set_yticks(range(k), names, fontsize=8 if k > 15 else 10)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8 if k > 10 else 10,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    acc = np.trace(cm) / total if total else float("nan")
    ax.set_title(f"{title}\naccuracy {acc:.3f} on {total} samples", fontsize=11)
    fig.tight_layout()
    return fig
