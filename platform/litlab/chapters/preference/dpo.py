"""LightningModule `dpo`: Direct Preference Optimisation (Rafailov et al. 2023) against a frozen reference.

    L_DPO = -log sigmoid( beta [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )
    (+ nll_weight * the per-token NLL of y_w under pi, when nll_weight > 0: "RPO", Pang et al. 2024)

log pi(y|x): summed over the completion tokens y_1..y_L EOS (prompt masked, losses.py). The policy
pi (`net`) starts as a copy of the reference pi_ref (`reference`), which is frozen: requires_grad
False (so build_optimizer leaves it out), always in eval mode, its log-probs under no_grad.

Where pi_ref comes from (`model.reference`):
  * a checkpoint file or MLflow run id of an `sft` run (two commands: `litlab run sft_*.yaml`, then
    `litlab run dpo_*.yaml model.reference=RUN_ID`). It is loaded at fit start; the DPO checkpoints
    then do NOT store it again (they name it in hparams and reload it from there);
  * null (default): it is fitted in-run at fit start, `ref_steps` SFT steps (the `sft` objective,
    AdamW at `ref_lr`; 2 steps under trainer.fast_dev_run), and then saved in the checkpoints,
    which are its only copy.

Logged per stage: {stage}/loss, the implicit rewards r_hat = beta (log pi - log pi_ref):
{stage}/rewards/chosen, {stage}/rewards/rejected, {stage}/rewards/margin (means) and
{stage}/rewards/accuracy (r_hat_w > r_hat_l); at val/test, of `samples_per_prompt` completions per
prompt sampled at `temperature` (1: the policy itself) with a fixed seed: {stage}/property_rate,
{stage}/valid_rate and {stage}/kl (mean of log pi(y|x) - log pi_ref(y|x) over the policy's samples:
an estimate of KL(pi || pi_ref) in nats). At test the reference is sampled with the same seeds:
test/ref_property_rate, test/ref_valid_rate; the chapter's result is property_rate vs ref_property_rate.
ref/sft_loss: the in-run reference's final SFT loss. Figures: plots/implicit_rewards.png.

Over-optimisation: L_DPO depends only on the log-ratio margin, so it keeps falling while pi moves
mass to completions no pair contains (on the no-'e' data: empty ones). {stage}/valid_rate and
{stage}/kl expose it; nll_weight > 0 (or early stopping on val/property_rate) prevents it.
(Lightning warns that modules are in eval mode at fit start: that is the frozen reference.)
"""

from __future__ import annotations

import copy
from typing import Annotated

import torch

from litlab.chapters.preference.losses import completion_logprob, dpo_loss
from litlab.chapters.preference.module import (
    CHAPTER,
    SMOKE_DATA,
    SMOKE_NET,
    BlockSize,
    Depth,
    Dropout,
    Length,
    PolicyBase,
    Positional,
    SamplesPerPrompt,
    Seed,
    Temperature,
    VocabSize,
    Width,
    build_gpt,
    log_histogram,
)
from litlab.chapters.preference.reference import load_reference_state, train_sft
from litlab.data.preferences import Property
from litlab.module import log_text
from litlab.registry import register_model
from litlab.schema import Range

REFERENCE_PREFIX = "reference."
# what must match between the reference checkpoint and this model
REFERENCE_MATCH = ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff", "positional",
                   "alphabet", "prompt_len", "max_len", "property")


@register_model(
    "dpo",
    chapter=CHAPTER,
    description="DPO: GPT policy vs a frozen SFT reference, -log sigmoid(beta * log-ratio margin); property rate vs ref",
    smoke={"model": {**SMOKE_NET, "ref_steps": 2}, "data": SMOKE_DATA},
)
class DPOModule(PolicyBase):
    def __init__(
        self,
        vocab_size: VocabSize,
        block_size: BlockSize,
        prompt_len: Length,
        min_len: Length,
        max_len: Length,
        alphabet: str,
        property: Property,
        beta: Annotated[float, Range(gt=0, le=100)] = 0.1,  # KL strength: small beta lets pi move far from pi_ref
        nll_weight: Annotated[float, Range(ge=0, le=100)] = 0.0,  # + nll_weight * NLL(y_w) per token (RPO); 0 = DPO
        reference: str | None = None,  # an sft checkpoint (.ckpt) or run id; None: fit it in-run (ref_steps)
        ref_steps: Annotated[int, Range(ge=0, le=1_000_000)] = 600,  # in-run reference only
        ref_lr: Annotated[float, Range(gt=0, le=1)] = 3e-3,  # in-run reference only
        n_layer: Depth = 2,
        n_head: Depth = 2,
        d_model: Width = 64,
        d_ff: Width | None = None,
        dropout: Dropout = 0.0,
        positional: Positional = "rope",
        temperature: Temperature = 1.0,
        samples_per_prompt: SamplesPerPrompt = 2,
        sample_seed: Seed = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = build_gpt(self.hparams)  # the policy pi_theta
        self.reference = copy.deepcopy(self.net)  # pi_ref: pi_theta = pi_ref until training moves pi_theta
        self.reference.requires_grad_(False).eval()
        self._reference_ready = False
        self._samples: list[str] = []
        self._test_rewards: list[torch.Tensor] = []

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()  # frozen: no dropout, whatever Lightning asks of the policy
        return self

    # ---------------------------------------------------------------- the reference
    def _tracking_uri(self) -> str | None:
        trainer = getattr(self, "_trainer", None)
        for lg in (trainer.loggers if trainer is not None else []):
            if getattr(lg, "tracking_uri", None):
                return lg.tracking_uri
        return None

    def load_reference(self, tracking_uri: str | None = None) -> None:
        """Load `hparams.reference` into the frozen reference (not the policy)."""
        expected = {k: self.hparams[k] for k in REFERENCE_MATCH}
        state = load_reference_state(self.hparams.reference, expected, tracking_uri or self._tracking_uri())
        self.reference.load_state_dict(state)
        self._reference_ready = True

    def prepare_reference(self, train_set=None, fast: bool = False, batch_size: int = 64) -> list[float]:
        """Load or fit pi_ref, then start the policy from it (pi_theta <- pi_ref). Returns the in-run
        SFT losses (empty when loaded)."""
        losses: list[float] = []
        if self.hparams.reference:
            self.load_reference()
        else:
            if train_set is None:
                raise RuntimeError("model.reference is null: the reference is fitted on the training pairs, "
                                   "pass train_set")
            steps = min(self.hparams.ref_steps, 2) if fast else self.hparams.ref_steps
            # fitted as the (trainable) policy, then copied: the reference itself never takes a gradient
            losses = train_sft(self.net, train_set, steps, self.hparams.ref_lr, batch_size)
            self.reference.load_state_dict(self.net.state_dict())
            self._reference_ready = True
        self.net.load_state_dict(self.reference.state_dict())
        return losses

    def on_fit_start(self):
        if self._reference_ready or self.trainer.ckpt_path:  # resuming: the checkpoint holds (or names) it
            return
        dm = getattr(self.trainer, "datamodule", None)
        losses = self.prepare_reference(getattr(dm, "train_set", None), fast=bool(self.trainer.fast_dev_run),
                                        batch_size=getattr(dm, "batch_size", 64))
        if self.trainer.world_size > 1:  # DDP already broadcast the initial weights: keep the ranks identical
            state = self.trainer.strategy.broadcast(self.reference.state_dict(), src=0)
            self.reference.load_state_dict(state)
            self.net.load_state_dict(state)
        if losses and self.trainer.is_global_zero:
            tail = losses[-min(len(losses), 50):]
            for lg in self.loggers:
                lg.log_metrics({"ref/sft_loss": sum(tail) / len(tail)}, step=0)

    def on_save_checkpoint(self, checkpoint):
        if self.hparams.reference:  # it lives in the sft run: store only the policy
            sd = checkpoint["state_dict"]
            for k in [k for k in sd if k.startswith(REFERENCE_PREFIX)]:
                del sd[k]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.hparams.reference and not any(k.startswith(REFERENCE_PREFIX) for k in state_dict):
            if not self._reference_ready:
                self.load_reference()
            state_dict = {**state_dict, **{REFERENCE_PREFIX + k: v for k, v in self.reference.state_dict().items()}}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ---------------------------------------------------------------- DPO
    def smoke_forward(self, batch) -> torch.Tensor:
        return self(batch[0])

    def pair_logprobs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy, reference) sequence log-probs (2B,): the B chosen, then the B rejected completions."""
        chosen, chosen_mask, rejected, rejected_mask = batch
        ids, mask = torch.cat([chosen, rejected]), torch.cat([chosen_mask, rejected_mask])  # (2B, T)
        policy = completion_logprob(self.net, ids, mask)
        with torch.no_grad():
            ref = completion_logprob(self.reference, ids, mask)
        return policy, ref

    def _step(self, batch, stage: str) -> torch.Tensor:
        b = len(batch[0])
        policy, ref = self.pair_logprobs(batch)
        loss, r_w, r_l = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], self.hparams.beta)
        train = stage == "train"
        kw = {"on_epoch": True, "sync_dist": not train, "batch_size": b}
        if self.hparams.nll_weight > 0:  # anchor the chosen completions' likelihood (Pang et al. 2024)
            nll = -policy[:b].sum() / batch[1][:, 1:].sum().clamp_min(1)  # per completion token
            self.log(f"{stage}/nll_chosen", nll.detach(), **kw)
            loss = loss + self.hparams.nll_weight * nll
        self.log(f"{stage}/loss", loss.detach(), on_step=train, prog_bar=not train, **kw)
        self.log(f"{stage}/rewards/chosen", r_w.mean(), **kw)
        self.log(f"{stage}/rewards/rejected", r_l.mean(), **kw)
        self.log(f"{stage}/rewards/margin", (r_w - r_l).mean(), **kw)
        self.log(f"{stage}/rewards/accuracy", (r_w > r_l).float().mean(), prog_bar=not train, **kw)
        if stage == "test":
            self._test_rewards.append(torch.stack([r_w, r_l]).cpu())
        return loss

    def _evaluate(self, batch, batch_idx: int, stage: str):
        self._step(batch, stage)
        scored = self.sample_and_score(self.net, batch[0], batch_idx)
        self.log_rates(scored, f"{stage}/")
        with torch.no_grad():  # KL(pi || pi_ref) ~ E_{y ~ pi} [log pi(y|x) - log pi_ref(y|x)]
            kl = completion_logprob(self.net, scored.ids, scored.mask) - \
                completion_logprob(self.reference, scored.ids, scored.mask)
        self.log(f"{stage}/kl", kl.mean(), on_epoch=True, batch_size=len(kl), sync_dist=True)
        return scored

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        scored = self._evaluate(batch, batch_idx, "test")
        ref_scored = self.sample_and_score(self.reference, batch[0], batch_idx)  # the same seeds as the policy
        self.log_rates(ref_scored, "test/ref_")
        if batch_idx == 0:
            self._samples = self.sample_lines(batch[0], {"reference": ref_scored, "dpo": scored})

    def on_test_epoch_end(self):
        h = self.hparams
        if self._samples:
            header = (f"# prompt, then a sample of the reference and of the DPO policy (beta {h.beta}, temperature "
                      f"{h.temperature}); + = has the property {h.property}\n")
            log_text(self, header + "\n".join(self._samples) + "\n", "samples/dpo_samples.txt")
        if self._test_rewards and self.loggers:
            r = torch.cat(self._test_rewards, dim=1)  # (2, N)
            log_histogram(self, r[0], r[1], f"DPO implicit rewards (beta {h.beta}) on test pairs",
                          "beta (log pi(y|x) - log pi_ref(y|x))", "plots/implicit_rewards.png")
        self._samples, self._test_rewards = [], []
