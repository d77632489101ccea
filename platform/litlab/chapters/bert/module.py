"""BERT LightningModules: `bert_mlm` (pretraining: masked LM + optional next-sentence prediction)
and `bert_classifier` (fine-tuning from a `bert_mlm` checkpoint, or from scratch).

Metrics (stage = train | val | test):
- bert_mlm: {stage}/loss (= mlm_loss + nsp_weight * nsp_loss), {stage}/mlm_loss, {stage}/mlm_acc
  (masked-token accuracy over every selected position), {stage}/mlm_majority_acc (val/test: the
  accuracy of always predicting the most frequent training token, the baseline to beat),
  {stage}/nsp_loss and {stage}/nsp_acc when nsp is on.
- bert_classifier: {stage}/loss, {stage}/acc (ClassifierModule), plus {stage}/majority_acc.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from litlab.chapters.bert.nets import BertClassifier, BertForPretraining, mlm_loss
from litlab.chapters.bert.pretrained import load_checkpoint, load_submodules, logger_tracking_uri
from litlab.data.corpus import IGNORE, NUM_SPECIAL
from litlab.epoch_stats import DeviceMean
from litlab.errors import ConfigError
from litlab.module import ClassifierModule
from litlab.registry import register_model
from litlab.schema import Range
from litlab.steps import StageSteps

CHAPTER = "5-6 Attention and transformers"

VocabSize = Annotated[int, Range(ge=NUM_SPECIAL + 1, le=10_000_000)]
MaxLen = Annotated[int, Range(ge=2, le=1_000_000)]
Width = Annotated[int, Range(ge=2, le=65_536)]
Heads = Annotated[int, Range(ge=1, le=1024)]
Layers = Annotated[int, Range(ge=1, le=128)]
FFWidth = Annotated[int, Range(ge=1, le=1_000_000)] | None  # None: 4 * d_model
Dropout = Annotated[float, Range(ge=0, lt=1)]
Backend = Literal["sdpa", "math"]

SMOKE_DATA = {"passage_tokens": 24, "n_train": 40, "batch_size": 8}


def stage_means() -> torch.nn.ModuleDict:
    """One mean per stage, keyed "train_", "val_", "test_" (DeviceMean: no host sync per update)."""
    return torch.nn.ModuleDict({f"{s}_": DeviceMean() for s in ("train", "val", "test")})


def encoder_kwargs(hp) -> dict:
    """The BertEncoder arguments from a module's hyper-parameters."""
    if hp.d_model % hp.n_heads:
        raise ConfigError("model.n_heads", f"{hp.n_heads} does not divide d_model={hp.d_model}")
    return dict(d_model=hp.d_model, n_heads=hp.n_heads, n_layers=hp.n_layers, d_ff=hp.d_ff,
                norm_first=hp.norm_first, backend=hp.backend)


def architecture(hp) -> dict:
    """What must match between a pretrained checkpoint and the model it initialises."""
    return {k: hp[k] for k in ("vocab_signature", "vocab_size", "max_len", "d_model", "n_heads", "n_layers",
                               "d_ff", "norm_first")}


@register_model(
    "bert_mlm",
    chapter=CHAPTER,
    description="BERT pretraining: post-LN transformer encoder, masked LM (15%, 80/10/10) + next-sentence prediction",
    smoke={"model": {"d_model": 16, "n_heads": 2, "n_layers": 1},
           "data": {"name": "pydoc_mlm", **SMOKE_DATA}},
)
class BertMLM(StageSteps):
    def __init__(
        self,
        vocab_size: VocabSize,
        max_len: MaxLen,  # position table size; the data sets it (passage_tokens + 3)
        vocab_signature: str,  # the data's vocabulary hash: fine-tuning checks it
        nsp: bool,  # next-sentence head; the data says whether its pairs are NSP pairs
        # the most selected positions in a row (the data sets it): the MLM head scores a fixed B x P
        # slots per batch; None: only the selected positions, whose count is read from the device
        max_predictions: Annotated[int, Range(ge=1, le=1_000_000)] | None = None,
        d_model: Width = 128,
        n_heads: Heads = 4,
        n_layers: Layers = 2,
        d_ff: FFWidth = None,
        dropout: Dropout = 0.1,
        norm_first: bool = False,  # False: BERT's post-LN blocks; True: pre-LN (+ a final LayerNorm)
        backend: Backend = "sdpa",
        nsp_weight: Annotated[float, Range(ge=0, le=100)] = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = BertForPretraining(vocab_size, max_len, nsp=nsp, max_predictions=max_predictions, dropout=dropout,
                                      **encoder_kwargs(self.hparams))
        # keyed "<stage>_" (a ModuleDict key "train" would shadow nn.Module.train)
        self.mlm_acc, self.majority_acc, self.nsp_acc = (stage_means() for _ in range(3))

    def forward(self, ids, segments, labels):
        return self.net(ids, segments, labels)

    def smoke_forward(self, batch):
        return self(*batch[:3])[0]

    def _step(self, batch, stage: str) -> torch.Tensor:
        ids, segments, labels, is_next = batch  # (B, T) x3, (B,)
        mlm_logits, targets, nsp_logits = self(ids, segments, labels)  # (N, V), (N,), (B, 2) | None
        loss_mlm = mlm_loss(mlm_logits, targets)
        loss = loss_mlm
        on_step = stage == "train"
        log = dict(on_epoch=True, sync_dist=stage != "train")
        if nsp_logits is not None:
            loss_nsp = F.cross_entropy(nsp_logits, is_next)
            loss = loss + self.hparams.nsp_weight * loss_nsp
            self.nsp_acc[f"{stage}_"].update((nsp_logits.argmax(-1) == is_next).float())
            self.log(f"{stage}/nsp_loss", loss_nsp.detach(), on_step=False, **log)
            self.log(f"{stage}/nsp_acc", self.nsp_acc[f"{stage}_"], on_step=False, on_epoch=True)
        scored = (targets != IGNORE).float()  # (N,): 0 on an empty slot
        self.mlm_acc[f"{stage}_"].update((mlm_logits.argmax(-1) == targets).float(), scored)
        if stage != "train":  # vocabulary ids are ranked by training frequency: NUM_SPECIAL is the most frequent
            self.majority_acc[f"{stage}_"].update((targets == NUM_SPECIAL).float(), scored)
        self.log(f"{stage}/loss", loss.detach(), on_step=on_step, prog_bar=stage == "val", **log)
        self.log(f"{stage}/mlm_loss", loss_mlm.detach(), on_step=False, **log)
        self.log(f"{stage}/mlm_acc", self.mlm_acc[f"{stage}_"], on_step=False, on_epoch=True, prog_bar=stage == "val")
        if stage != "train":
            self.log(f"{stage}/mlm_majority_acc", self.majority_acc[f"{stage}_"], on_step=False, on_epoch=True)
        return loss



class PretrainedEncoderMixin:
    """`setup("fit")` loads `hparams.pretrained` (a checkpoint path or run id) into the submodules
    named by `pretrained_targets()`, once, before the optimiser is built; resuming a run then
    overwrites them with its own checkpoint. `load_pretrained()` does it by hand outside a Trainer."""

    _pretrained_done = False

    def pretrained_targets(self) -> tuple[dict, dict]:
        """({name: module}, {name: state_dict prefix in the source checkpoint})."""
        raise NotImplementedError

    def load_pretrained(self, tracking_uri: str | None = None) -> list[str]:
        ckpt = load_checkpoint(self.hparams.pretrained, tracking_uri or logger_tracking_uri(self))
        target, prefix = self.pretrained_targets()
        loaded = load_submodules(target, ckpt, prefix, architecture(self.hparams))
        self._pretrained_done = True
        return loaded

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.pretrained and not self._pretrained_done:
            self.load_pretrained()


@register_model(
    "bert_classifier",
    chapter=CHAPTER,
    description="BERT fine-tuning: [CLS]-pooled sequence classifier, encoder initialised from a bert_mlm checkpoint",
    smoke={"model": {"d_model": 16, "n_heads": 2, "n_layers": 1},
           "data": {"name": "pydoc_sections", **SMOKE_DATA}},
)
class BertSequenceClassifier(PretrainedEncoderMixin, ClassifierModule):
    def __init__(
        self,
        vocab_size: VocabSize,
        max_len: MaxLen,
        vocab_signature: str,
        num_classes: Annotated[int, Range(ge=2, le=1_000_000)],
        pretrained: str | None = None,  # a bert_mlm checkpoint (.ckpt) or MLflow run id; None: from scratch
        pooling: Literal["cls", "mean"] = "cls",  # tanh pooler on h_[CLS] (BERT) | mean over the tokens
        freeze_encoder: bool = False,  # True: train only the pooler and head (BERT's feature-based use)
        d_model: Width = 128,
        n_heads: Heads = 4,
        n_layers: Layers = 2,
        d_ff: FFWidth = None,
        dropout: Dropout = 0.1,
        norm_first: bool = False,
        backend: Backend = "sdpa",
    ):
        super().__init__(num_classes)
        self.save_hyperparameters()
        self.net = BertClassifier(vocab_size, max_len, num_classes, dropout=dropout, pooling=pooling,
                                  **encoder_kwargs(self.hparams))
        if freeze_encoder:
            self.net.encoder.requires_grad_(False)
        self.majority = stage_means()
        self.register_buffer("majority_class", torch.tensor(-1), persistent=False)

    def pretrained_targets(self):
        targets = {"encoder": self.net.encoder}
        if self.net.pooler is not None:  # loaded when the MLM had one (trained by next-sentence prediction)
            targets["pooler"] = self.net.pooler
        return targets, {"encoder": "net.encoder.", "pooler": "net.pooler."}

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        train = getattr(dm, "train_set", None)
        if train is not None and hasattr(train, "tensors"):  # the most frequent training label
            self.majority_class = torch.bincount(train.tensors[1]).argmax().to(self.device)

    def _shared_step(self, batch, stage: str) -> torch.Tensor:
        loss = super()._shared_step(batch, stage)
        if stage != "train" and self.majority_class >= 0:
            self.majority[f"{stage}_"].update((batch[1] == self.majority_class).float())
            self.log(f"{stage}/majority_acc", self.majority[f"{stage}_"], on_step=False, on_epoch=True)
        return loss
