"""Chapter 12, LLM techniques: `gpt_moe`, the GPT of module.py with mixture-of-experts FFNs (moe.py).

Training loss = LM cross-entropy + aux_loss_coef * L_aux, L_aux = mean over the MoE layers of
E * sum_i f_i P_i (Switch/GShard load balancing). Logged: train/aux_loss (per step and epoch),
train/expert_frac_e{i} per epoch (share of the routing slots that chose expert i, averaged over
the MoE layers; balanced = 1/E), train/expert_imbalance (E * max_i f_i averaged over layers;
balanced = 1, all tokens on one expert = E), train/dropped_frac when capacity_factor is set, and at
the end plots/expert_utilisation.png (f_i per epoch, and the last epoch per layer).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from litlab.chapters.gpt.module import (MOE_CHAPTER, Backend, BlockSize, Depth, Dropout, GPTBase, Length,
                                        Positional, Seed, Temperature, TopK, VocabSize, Width)
from litlab.errors import ConfigError
from litlab.registry import register_model
from litlab.schema import Range


def utilisation_figure(history: list[torch.Tensor]):
    """history: per epoch a (layers, E) tensor of routing shares f -> a matplotlib Figure."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    f = torch.stack(history).float()  # (epochs, layers, E)
    n_epochs, n_layers, n_experts = f.shape
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = range(1, n_epochs + 1)
    for i in range(n_experts):
        ax1.plot(epochs, f[:, :, i].mean(1).numpy(), marker="o", label=f"expert {i}")
    ax1.axhline(1 / n_experts, color="k", ls="--", lw=1, label="balanced 1/E")
    ax1.set(xlabel="epoch", ylabel="share of routed tokens f_i", title="expert utilisation (mean over MoE layers)")
    ax1.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax1.legend(fontsize=7, ncol=2)
    im = ax2.imshow(f[-1].numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax2.set(xlabel="expert", ylabel="MoE layer", title=f"last epoch per layer (balanced = {1 / n_experts:.3f})")
    ax2.set_xticks(range(n_experts))
    ax2.set_yticks(range(n_layers))
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    return fig


@register_model(
    "gpt_moe",
    chapter=MOE_CHAPTER,
    description="GPT with sparsely-gated mixture-of-experts FFNs (noisy top-k router, load-balancing loss)",
    smoke={"model": {"n_layer": 2, "n_head": 2, "d_model": 16, "block_size": 16, "n_experts": 4,
                     "moe_top_k": 2, "capacity_factor": 1.5, "moe_dispatch": "buffers", "sample_length": 20},
           "data": {"name": "text_chars", "max_chars": 20000, "seq_len": 16, "batch_size": 8}},
)
class GPTMoEModule(GPTBase):
    def __init__(
        self,
        vocab_size: VocabSize,
        block_size: BlockSize = 128,
        n_layer: Depth = 4,
        n_head: Depth = 4,
        d_model: Width = 128,
        d_ff: Width | None = None,  # width of each expert FFN; None: 4 d_model
        dropout: Dropout = 0.0,
        positional: Positional = "learned",
        attention: Backend = "sdpa",
        attention_options: dict | None = None,
        tie_weights: bool = True,
        n_experts: Annotated[int, Range(ge=1, le=4096)] = 8,  # E
        moe_top_k: Annotated[int, Range(ge=1, le=4096)] = 2,  # k experts per token
        moe_every: Annotated[int, Range(ge=1, le=512)] = 1,  # MoE FFN in every n-th block (others dense)
        noisy_gating: bool = True,  # H(x) = x W_g + N(0,1) softplus(x W_noise) while training
        capacity_factor: Annotated[float, Range(gt=0, le=1024)] | None = None,  # None: no capacity limit
        # with a capacity: "buffers" = fixed-size expert buffers (no host sync), "grouped" = groups
        # sized on the host, "auto" = buffers on a GPU, grouped on a CPU (moe.py)
        moe_dispatch: Literal["auto", "buffers", "grouped"] = "auto",
        aux_loss_coef: Annotated[float, Range(ge=0, le=100)] = 0.01,  # alpha in L + alpha L_aux
        temperature: Temperature = 0.8,
        sample_top_k: TopK = None,
        prompt: str = "The ",
        sample_length: Length = 500,
        sample_seed: Seed = 0,
    ):
        super().__init__()
        if moe_top_k > n_experts:
            raise ConfigError("model.moe_top_k", f"{moe_top_k} > model.n_experts {n_experts}")
        if moe_every > n_layer:
            raise ConfigError("model.moe_every", f"{moe_every} > model.n_layer {n_layer}: no block would be MoE")
        self.save_hyperparameters()
        self._build(self.hparams)
        n_moe = len(self.net.moe_layers)
        self.register_buffer("_load", torch.zeros(n_moe, n_experts), persistent=False)  # slots per expert
        self.register_buffer("_dropped", torch.zeros(()), persistent=False)
        self.utilisation: list[torch.Tensor] = []  # per epoch (layers, E) shares f, for the plot

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        aux = self.net.aux_loss()  # mean over MoE layers of E sum_i f_i P_i
        self.log("train/aux_loss", aux.detach(), on_step=True, on_epoch=True)
        layers = self.net.moe_layers
        self._load += torch.stack([m.load for m in layers])  # (layers, E), no host sync
        self._dropped += torch.stack([m.dropped for m in layers]).sum()
        return loss + self.hparams.aux_loss_coef * aux

    def on_train_epoch_end(self):
        total = self._load.sum(-1, keepdim=True)  # (layers, 1): routing slots = tokens x k
        if not total.gt(0).all():
            return
        f = self._load / total  # (layers, E)
        for i, fi in enumerate(f.mean(0)):
            self.log(f"train/expert_frac_e{i}", fi, sync_dist=True)
        self.log("train/expert_imbalance", (f.max(-1).values * f.shape[-1]).mean(), sync_dist=True)
        if self.hparams.capacity_factor is not None:
            self.log("train/dropped_frac", self._dropped / total.sum(), sync_dist=True)
        self.utilisation.append(f.detach().cpu())
        self._load.zero_()
        self._dropped.zero_()

    def on_fit_end(self):
        super().on_fit_end()
        if self.utilisation and self.trainer.is_global_zero and self.loggers:
            import matplotlib.pyplot as plt

            fig = utilisation_figure(self.utilisation)
            self.log_figure(fig, "plots/expert_utilisation.png")
            plt.close(fig)
