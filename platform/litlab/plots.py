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

    run = c.get_run(run_id)
    panels: dict[str, list[tuple[str, str]]] = defaultdict(list)  # quantity -> [(label, key)]
    for key in sorted(run.data.metrics):
        stage, _, rest = key.partition("/")
        if stage not in ("train", "val") or not rest:
            continue
        if stage == "train" and rest.endswith("_step") and f"train/{rest[:-5]}_epoch" in run.data.metrics:
            continue  # the epoch mean reads better than noisy per-step points when both exist
        quantity = rest.removesuffix("_epoch").removesuffix("_step")
        panels[quantity].append((f"{stage}", key))
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
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(quantity)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_grid(images, title: str = "", nrow: int | None = None, labels=None, cmap: str = "gray"):
    """Images (N, C, H, W) or (N, H, W), values in [0, 1] (clipped) -> a matplotlib Figure with the
    images on a grid of `nrow` rows (default: about square), each optionally titled by `labels[i]`.
    Used for sample grids, reconstructions and traversals of the generative chapters."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    arr = images.detach().float().cpu().clamp(0, 1).numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim == 4:
        arr = arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)  # (N, H, W) or (N, H, W, 3)
    n = len(arr)
    rows = nrow or max(1, int(np.floor(np.sqrt(n))))
    cols = int(np.ceil(n / rows))
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows + (0.4 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(arr[i], cmap=cmap if arr.ndim == 3 else None, vmin=0, vmax=1)
            if labels is not None:
                ax.set_title(str(labels[i]), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
