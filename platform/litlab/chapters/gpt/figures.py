"""plots/attention.png of a GPT: causal self-attention weights over a stretch of its own sample."""

from __future__ import annotations

import torch
from torch import Tensor

MAX_LAYERS, MAX_HEADS = 3, 4  # panels: first, middle and last layer x the first heads


def shown_layers(n_layer: int) -> list[int]:
    """The first, middle and last layer (fewer when the model has fewer)."""
    return sorted({0, n_layer // 2, n_layer - 1})[:MAX_LAYERS]


def token_label(token: str) -> str:
    return {" ": "␣", "\n": "⏎", "\t": "⇥"}.get(token, token)


def self_attention_figure(weights: dict[int, Tensor], tokens: list[str], title: str):
    """weights {layer: (H, T, T)} (row t: the weights query t gives keys 0..t, summing to 1) ->
    a Figure with one heat map per (layer, head) panel, rows = queries, columns = keys."""
    from matplotlib.figure import Figure

    layers = sorted(weights)
    heads = min(MAX_HEADS, weights[layers[0]].shape[0])
    labels = [token_label(t) for t in tokens]
    fig = Figure(figsize=(3.0 * heads + 0.8, 3.0 * len(layers) + 0.6), layout="constrained")
    axes = fig.subplots(len(layers), heads, squeeze=False)
    im = None
    for row, layer in enumerate(layers):
        for h in range(heads):
            ax = axes[row, h]
            im = ax.imshow(weights[layer][h].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer + 1}, head {h + 1}", fontsize=8)
            # Every panel shows the same tokens: label them on the outer panels only. A tick label on
            # each of 12 panels' 2 x 40 ticks took 7 of the 8 s this figure cost (ticks and layout).
            if h == 0:
                ax.set_yticks(range(len(labels)), labels, fontsize=5)
                ax.set_ylabel("query token")
            else:
                ax.set_yticks([])
            if row == len(layers) - 1:
                ax.set_xticks(range(len(labels)), labels, fontsize=5)
                ax.set_xlabel("key token")
            else:
                ax.set_xticks([])
    fig.colorbar(im, ax=axes.flatten().tolist(), label="attention weight", shrink=0.8)
    fig.suptitle(title)
    return fig


@torch.no_grad()
def attention_weights(net, ids: Tensor, layers: list[int]) -> dict[int, Tensor]:
    """Run the GPT `net` on ids (1, T) in eval mode keeping the self-attention weights of `layers`
    (computed by the exact math path): {layer: (H, T, T)}."""
    was_training = net.training
    net.eval()
    blocks = [net.blocks[i] for i in layers]
    for b in blocks:
        b.keep_weights = True
    try:
        net(ids)
        return {i: net.blocks[i].attn_weights[0] for i in layers}
    finally:
        for b in blocks:
            b.keep_weights, b.attn_weights = False, None
        net.train(was_training)
