"""Chapter 10 figures: 2-D embeddings of node/graph representations, over-smoothing curves."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Projection = Literal["pca", "tsne", "none"]


def project_2d(h: Tensor, method: Projection = "pca", seed: int = 0) -> Tensor:
    """(N, F) -> (N, 2): PCA (top-2 principal components, via SVD of the centred data) or t-SNE (sklearn)."""
    h = h.detach().float().cpu()
    if h.size(1) == 1:
        return torch.cat([h, torch.zeros_like(h)], dim=1)
    if method == "tsne" and h.size(0) > 3:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (h.size(0) - 1) / 3)
        return torch.as_tensor(TSNE(2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(h.numpy()))
    centred = h - h.mean(0)
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)  # rows of vt: principal directions
    return centred @ vt[:2].t()


def embedding_figure(h: Tensor, labels: Tensor, title: str, method: Projection = "pca",
                     highlight: Tensor | None = None, highlight_label: str = "training nodes"):
    """Scatter of the 2-D projection of h (N, F) coloured by class; `highlight` (N,) bool circles
    some points (e.g. the labelled training nodes)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    xy = project_2d(h, method)
    labels = labels.detach().cpu()
    fig = Figure(figsize=(6, 5), layout="tight")
    ax = fig.subplots()
    classes = labels.unique().tolist()
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    size = 30 if len(labels) <= 500 else 8
    for c in classes:
        sel = labels == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=cmap(int(c) % cmap.N), label=f"class {int(c)}", alpha=0.8)
    if highlight is not None and highlight.any():
        sel = highlight.detach().cpu()
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size * 4, facecolors="none", edgecolors="black", linewidths=1.2,
                   label=highlight_label)
    ax.set(title=title, xlabel=f"{method.upper()} 1", ylabel=f"{method.upper()} 2")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return fig


def oversmoothing_figure(depths: list[int], accuracy: dict[str, list[float]], mad: list[float],
                         mad_by_layer: list[float], mad_by_layer_init: list[float] | None, title: str):
    """Left: accuracy vs number of layers L. Right (log-log): MAD of the output of the L-layer network
    vs L, and MAD after each layer k of the deepest network, trained and (if given) at initialisation."""
    from matplotlib.figure import Figure

    floor = 1e-6  # MAD can be exactly 0 (identical representations): drawn at the floor of the log axis
    fig = Figure(figsize=(11, 4.2), layout="tight")
    ax_acc, ax_mad = fig.subplots(1, 2)
    for stage, values in accuracy.items():
        ax_acc.plot(depths, values, marker="o", label=f"{stage} accuracy")
    ax_acc.set(xscale="log", xlabel="number of layers L", ylabel="accuracy", ylim=(0, 1.02), title=title)
    ax_mad.plot(depths, [max(m, floor) for m in mad], marker="o", label="output of the L-layer network (trained)")
    deepest = len(mad_by_layer)
    layers = range(1, deepest + 1)
    ax_mad.plot(layers, [max(m, floor) for m in mad_by_layer], marker=".", linestyle="--",
                label=f"after layer k of the {deepest}-layer network (trained)")
    if mad_by_layer_init:
        ax_mad.plot(layers, [max(m, floor) for m in mad_by_layer_init], marker=".", linestyle=":",
                    label=f"after layer k of the {deepest}-layer network (at init)")
    ax_mad.set(xscale="log", yscale="log", xlabel="number of layers (L or k)",
               ylabel="MAD (mean pairwise cosine distance)", ylim=(floor / 2, 2.5),
               title="node representations collapse: over-smoothing")
    for ax in (ax_acc, ax_mad):
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.grid(alpha=0.3, which="both")
    ax_acc.legend(fontsize=8)
    ax_mad.legend(fontsize=8, loc="lower left")
    return fig
