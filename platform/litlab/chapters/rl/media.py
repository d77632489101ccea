"""Files an RL run stores: a GIF of an evaluation episode and the return curve.

`write_gif(frames, path, fps)` uses Pillow's GIF writer. `log_file(module, path, folder)` hands a
local file to every logger that stores files (litlab's MlflowTracker.log_artifact(local_path,
artifact_path)); rank 0 only. `returns_figure(...)` draws the return of every training episode
(and its moving average) and the greedy evaluation returns, against environment steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_gif(frames: Sequence[np.ndarray], path: str | Path, fps: float) -> Path:
    """rgb frames (H, W, 3) uint8 -> an animated, looping GIF at `path`."""
    from PIL import Image

    if not frames:
        raise ValueError("no frames to write")
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    duration_ms = max(20, round(1000 / fps))  # GIF delays are in 10 ms units; browsers clamp < 20 ms
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return Path(path)


def log_file(module, path: str | Path, folder: str | None = None) -> bool:
    """Store a local file with every logger that can (rank 0 only); True if one took it."""
    if module._trainer is not None and not module.trainer.is_global_zero:
        return False
    stored = False
    for logger in module.loggers:
        if hasattr(logger, "log_artifact"):
            logger.log_artifact(str(path), folder)
            stored = True
    return stored


def returns_figure(episodes: Sequence[tuple[int, float, int]], evaluations: Sequence[tuple[int, float]],
                   title: str, max_return: float | None = None, window: int = 20):
    """episodes: (env step at its end, return, length) of training episodes (exploring policy);
    evaluations: (env step, mean greedy return over the evaluation episodes)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if episodes:
        steps = np.array([e[0] for e in episodes])
        rets = np.array([e[1] for e in episodes])
        ax.plot(steps, rets, color="tab:blue", alpha=0.25, linewidth=0.8, label="training episode")
        if len(rets) >= window:
            smooth = np.convolve(rets, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"training, mean of {window}")
    if evaluations:
        ax.plot([e[0] for e in evaluations], [e[1] for e in evaluations], "o-", color="tab:orange",
                markersize=4, label="evaluation (greedy), val/return")
    if max_return is not None:
        ax.axhline(max_return, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig
