"""Figures of the autoencoder chapter (matplotlib Figures from tensors; no Lightning)."""

from __future__ import annotations

import torch
from torch import Tensor

from litlab.plots import image_grid


def reconstruction_figure(inputs: Tensor, outputs: Tensor, title: str):
    """Two rows: the inputs (n, C, H, W) above their reconstructions (n, C, H, W), both in [0, 1]."""
    n = len(inputs)
    labels = ["input"] + [""] * (n - 1) + ["output"] + [""] * (n - 1)
    return image_grid(torch.cat([inputs, outputs]), title=title, nrow=2, labels=labels)


def traversal_codes(center: Tensor, scale: Tensor, dims: list[int], steps: int, span: float = 2.5) -> Tensor:
    """Codes (len(dims) * steps, latent): row i moves z[dims[i]] over center +- span * scale, the
    other coordinates held at `center` (latent,)."""
    offsets = torch.linspace(-span, span, steps, device=center.device)  # (S,)
    rows = []
    for d in dims:
        z = center.expand(steps, -1).clone()  # (S, latent)
        z[:, d] = center[d] + offsets * scale[d]
        rows.append(z)
    return torch.cat(rows)


def traversal_figure(images: Tensor, dims: list[int], steps: int, title: str):
    """images (len(dims) * steps, C, H, W), one row per latent dimension."""
    labels = [f"z{d}" if j == 0 else "" for d in dims for j in range(steps)]
    return image_grid(images, title=title, nrow=len(dims), labels=labels)


def latent_scatter_figure(codes: Tensor, labels: Tensor | None, title: str):
    """codes (N, latent): the two coordinates when latent = 2, else the first two principal
    components (centred SVD); points coloured by label."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    codes = codes.detach().float().cpu()
    if codes.shape[1] == 1:
        xy, axes = torch.cat([codes, torch.zeros_like(codes)], 1), ("z0", "")
    elif codes.shape[1] == 2:
        xy, axes = codes, ("z0", "z1")
    else:
        centred = codes - codes.mean(0)
        _, s, vt = torch.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T  # (N, 2)
        share = (s[:2] ** 2 / (s**2).sum()).tolist()
        axes = (f"PC1 ({share[0]:.0%} of variance)", f"PC2 ({share[1]:.0%})")
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    c = labels.cpu().numpy() if labels is not None else None
    points = ax.scatter(xy[:, 0].numpy(), xy[:, 1].numpy(), c=c, cmap="tab10", s=8, vmin=-0.5, vmax=9.5)
    if c is not None:
        fig.colorbar(points, ax=ax, ticks=range(10), label="digit")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
