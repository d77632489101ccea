"""LightningModules `sft` (the reference policy) and `reward_model` (Bradley-Terry) over `preferences` data.

`sft`: a small GPT fitted by supervised fine-tuning on the completions of the preference pairs
(loss: mean NLL of the completion tokens; the prompt is context only). With train_on=both it sees
the chosen AND the rejected completion of every pair, so half of its training completions have the
property and its samples have it ~50% of the time: the reference pi_ref that `dpo` starts from.
train_on=chosen is the "filtered SFT" baseline (fit only the preferred completions).
Logged: {stage}/loss, and at val/test, of `samples_per_prompt` completions sampled per prompt
(temperature 1 by default, fixed seed): {stage}/property_rate (well-formed AND has the property)
and {stage}/valid_rate (ended with EOS, letters only, length in [min_len, max_len]).

`reward_model`: r(x, y), a scalar head on a causal GPT trunk read at EOS (nets.RewardModel), fitted
with the Bradley-Terry loss -log sigmoid(r(x, y_w) - r(x, y_l)). Logged: {stage}/loss,
{stage}/acc (preference accuracy: r(x, y_w) > r(x, y_l)), {stage}/margin (mean r_w - r_l), and at
the end plots/rewards.png (histograms of r on the test pairs).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from litlab.chapters.gpt.nets import GPT
from litlab.chapters.preference.losses import bradley_terry_loss, sft_loss
from litlab.chapters.preference.nets import (
    RewardModel,
    sample_completions,
    score_completions,
)
from litlab.data.preferences import N_SPECIAL, Property
from litlab.errors import ConfigError
from litlab.module import LitlabModule, log_text
from litlab.registry import register_model
from litlab.schema import Range
from litlab.steps import StageSteps

CHAPTER = "12 LLM techniques"

VocabSize = Annotated[int, Range(ge=5, le=1_000_000)]
BlockSize = Annotated[int, Range(ge=4, le=100_000)]
Length = Annotated[int, Range(ge=1, le=200)]
Depth = Annotated[int, Range(ge=1, le=64)]
Width = Annotated[int, Range(ge=1, le=16_384)]
Dropout = Annotated[float, Range(ge=0, lt=1)]
Positional = Literal["learned", "sinusoidal", "rope"]
Temperature = Annotated[float, Range(gt=0, le=100)]  # sampling for the property rate; 1 = the model's own distribution
SamplesPerPrompt = Annotated[int, Range(ge=1, le=1000)]
Seed = Annotated[int, Range(ge=0, lt=2**31)]

SMOKE_DATA = {"name": "preferences", "n_train": 64, "n_val": 16, "n_test": 16, "batch_size": 8}
SMOKE_NET = {"n_layer": 1, "n_head": 2, "d_model": 16, "samples_per_prompt": 1}


def check_architecture(h) -> None:
    if h.d_model % h.n_head:
        raise ConfigError("model.d_model", f"{h.d_model} is not divisible by model.n_head={h.n_head}")
    if h.positional == "rope" and (h.d_model // h.n_head) % 2:
        raise ConfigError("model.positional", f"rope needs an even head dimension, d_model / n_head = "
                                              f"{h.d_model // h.n_head}")


def build_gpt(h) -> GPT:
    check_architecture(h)
    return GPT(h.vocab_size, h.block_size, h.n_layer, h.n_head, h.d_model, h.d_ff, h.dropout, h.positional)


def log_histogram(module: LitlabModule, chosen: torch.Tensor, rejected: torch.Tensor, title: str, xlabel: str,
                  artifact_file: str) -> None:
    """Histograms of a score of the chosen and the rejected completions, stored as `artifact_file`."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    lo, hi = float(torch.minimum(chosen.min(), rejected.min())), float(torch.maximum(chosen.max(), rejected.max()))
    bins = torch.linspace(lo, hi + 1e-6, 31).numpy()
    ax.hist(chosen.numpy(), bins=bins, alpha=0.6, label="chosen y_w (has the property)")
    ax.hist(rejected.numpy(), bins=bins, alpha=0.6, label="rejected y_l")
    ax.set(title=title, xlabel=xlabel, ylabel="test pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    module.log_figure(fig, artifact_file)
    plt.close(fig)


class PolicyBase(LitlabModule):
    """A GPT policy over BOS x SEP y EOS sequences, with sampled property-rate evaluation."""

    net: GPT

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)  # (B, T) -> next-token logits (B, T, V)

    @property
    def prompt_tokens(self) -> int:
        return self.hparams.prompt_len + 2  # BOS x_1..x_P SEP

    def sample_and_score(self, net: GPT, chosen: torch.Tensor, batch_idx: int):
        """Sample `samples_per_prompt` completions of each prompt of the batch (seeded by batch_idx,
        so every evaluation, and every model, draws the same random numbers) and check them."""
        h = self.hparams
        prompts = chosen[:, : self.prompt_tokens].repeat_interleave(h.samples_per_prompt, dim=0)  # (B k, P + 2)
        g = torch.Generator(device=chosen.device).manual_seed(h.sample_seed * 1_000_003 + batch_idx)
        ids = sample_completions(net, prompts, h.max_len + 1, h.temperature, g)  # (B k, block_size)
        return score_completions(ids, self.prompt_tokens, h.alphabet, h.property, h.min_len, h.max_len)

    def log_rates(self, scored, prefix: str) -> None:
        n = len(scored.has)
        self.log(f"{prefix}property_rate", scored.has.float().mean(), on_epoch=True, batch_size=n)
        self.log(f"{prefix}valid_rate", scored.valid.float().mean(), on_epoch=True, batch_size=n)

    def sample_lines(self, chosen: torch.Tensor, named: dict[str, object], n: int = 24) -> list[str]:
        """One line per prompt: the prompt, then each model's first sample, with + / - for the property."""
        k, lines = self.hparams.samples_per_prompt, []
        alphabet = self.hparams.alphabet
        for i in range(min(n, len(chosen))):
            prompt = "".join(alphabet[t - N_SPECIAL] for t in chosen[i, 1: self.prompt_tokens - 1].tolist())
            cols = [f"{name}: {s.texts[i * k]!r:<12} {'+' if s.has[i * k] else '-'}" for name, s in named.items()]
            lines.append(f"{prompt!r:<10} " + "   ".join(cols))
        return lines


@register_model(
    "sft",
    chapter=CHAPTER,
    description="SFT reference policy: small GPT fitted on both completions of preference pairs (property rate ~50%)",
    smoke={"model": SMOKE_NET, "data": SMOKE_DATA},
)
class SFTModule(PolicyBase):
    def __init__(
        self,
        vocab_size: VocabSize,
        block_size: BlockSize,
        prompt_len: Length,
        min_len: Length,
        max_len: Length,
        alphabet: str,
        property: Property,
        n_layer: Depth = 2,
        n_head: Depth = 2,
        d_model: Width = 64,
        d_ff: Width | None = None,  # None: 4 d_model
        dropout: Dropout = 0.0,
        positional: Positional = "rope",
        train_on: Literal["both", "chosen"] = "both",  # chosen: fit only the preferred completions
        temperature: Temperature = 1.0,
        samples_per_prompt: SamplesPerPrompt = 2,
        sample_seed: Seed = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = build_gpt(self.hparams)
        self._samples: list[str] = []

    def _step(self, batch, stage: str) -> torch.Tensor:
        chosen, chosen_mask, rejected, rejected_mask = batch  # (B, T) each
        if self.hparams.train_on == "both":
            ids, mask = torch.cat([chosen, rejected]), torch.cat([chosen_mask, rejected_mask])  # (2B, T)
        else:
            ids, mask = chosen, chosen_mask
        loss = sft_loss(self.net, ids, mask)
        train = stage == "train"
        self.log(f"{stage}/loss", loss.detach(), on_step=train, on_epoch=True, prog_bar=not train,
                 sync_dist=not train)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")
        self.log_rates(self.sample_and_score(self.net, batch[0], batch_idx), "val/")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")
        scored = self.sample_and_score(self.net, batch[0], batch_idx)
        self.log_rates(scored, "test/")
        if batch_idx == 0:
            self._samples = self.sample_lines(batch[0], {"sft": scored})

    def on_test_epoch_end(self):
        if self._samples:
            h = self.hparams
            header = f"# sft ({h.train_on}) samples, temperature {h.temperature}; + = has {h.property}\n"
            log_text(self, header + "\n".join(self._samples) + "\n", "samples/sft_samples.txt")


@register_model(
    "reward_model",
    chapter=CHAPTER,
    description="Bradley-Terry reward model: scalar head on a causal GPT trunk, -log sigmoid(r_w - r_l), preference acc",
    smoke={"model": {"n_layer": 1, "n_head": 2, "d_model": 16}, "data": SMOKE_DATA},
)
class RewardModelModule(StageSteps):
    def __init__(
        self,
        vocab_size: VocabSize,
        block_size: BlockSize,
        n_layer: Depth = 2,
        n_head: Depth = 2,
        d_model: Width = 64,
        d_ff: Width | None = None,
        dropout: Dropout = 0.0,
        positional: Positional = "rope",
    ):
        super().__init__()
        self.save_hyperparameters()
        check_architecture(self.hparams)
        self.net = RewardModel(vocab_size, block_size, n_layer, n_head, d_model, d_ff, dropout, positional)
        self._test_rewards: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(ids, mask)  # (B,) r(x, y)

    def smoke_forward(self, batch) -> torch.Tensor:
        return self(batch[0], batch[1])

    def _step(self, batch, stage: str) -> torch.Tensor:
        chosen, chosen_mask, rejected, rejected_mask = batch
        b = len(chosen)
        r = self(torch.cat([chosen, rejected]), torch.cat([chosen_mask, rejected_mask]))  # (2B,) one pass
        r_w, r_l = r[:b], r[b:]
        loss = bradley_terry_loss(r_w, r_l)
        train = stage == "train"
        self.log(f"{stage}/loss", loss.detach(), on_step=train, on_epoch=True, prog_bar=not train, sync_dist=not train)
        self.log(f"{stage}/acc", (r_w > r_l).float().mean(), on_epoch=True, on_step=False, prog_bar=not train,
                 sync_dist=not train)
        self.log(f"{stage}/margin", (r_w - r_l).detach().mean(), on_epoch=True, on_step=False, sync_dist=not train)
        if stage == "test":
            self._test_rewards.append(torch.stack([r_w, r_l]).detach().cpu())
        return loss


    def on_test_epoch_end(self):
        if self._test_rewards and self.loggers:
            r = torch.cat(self._test_rewards, dim=1)  # (2, N)
            log_histogram(self, r[0], r[1], "Bradley-Terry reward model on test pairs", "r(x, y)", "plots/rewards.png")
        self._test_rewards = []
