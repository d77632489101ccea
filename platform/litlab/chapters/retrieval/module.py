"""`retriever`: a bi-encoder trained with InfoNCE over in-batch negatives, evaluated by recall@k
over the whole passage index (data `pydoc_retrieval`: inverse cloze task on the pydoc corpus).

Metrics: train/loss (InfoNCE), train/acc (in-batch top-1: the positive scores highest of the batch's
passages); val|test/recall_at_{1,5,10}, val|test/mrr, val|test/loss (cross-entropy of the gold
passage under softmax(s / tau) over ALL N passages, i.e. InfoNCE with the full index as negatives).
The index is re-encoded at the start of every validation/test epoch from the datamodule's
`index()` (N, W).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from litlab.chapters.bert.module import (Backend, Dropout, FFWidth, Heads, Layers, MaxLen, PretrainedEncoderMixin,
                                         VocabSize, Width, stage_means)
from litlab.chapters.retrieval.nets import BiEncoder, gold_ranks, info_nce
from litlab.errors import ConfigError
from litlab.module import LitlabModule
from litlab.registry import register_model
from litlab.schema import Range

CHAPTER = "12 LLM techniques"
RECALL_KS = (1, 5, 10)
Temperature = Annotated[float, Range(gt=0, le=10)]
Pooling = Literal["mean", "cls"]


def datamodule_index(module) -> torch.Tensor:
    """The (N, W) passage index of the trainer's datamodule (pydoc_retrieval / pydoc_rag)."""
    dm = getattr(module._trainer, "datamodule", None) if module._trainer is not None else None
    if dm is None or not hasattr(dm, "index"):
        raise RuntimeError(f"{type(module).__name__} evaluates against the datamodule's passage index: use it "
                           "with data pydoc_retrieval or pydoc_rag (trainer.fit/test(model, datamodule=dm))")
    return dm.index().to(module.device)


def encoder_args(d_model, n_heads, n_layers, d_ff, dropout, norm_first, backend) -> dict:
    if d_model % n_heads:
        raise ConfigError("model.n_heads", f"{n_heads} does not divide d_model={d_model}")
    return dict(d_model=d_model, n_heads=n_heads, n_layers=n_layers, d_ff=d_ff, dropout=dropout,
                norm_first=norm_first, backend=backend)


@register_model(
    "retriever",
    chapter=CHAPTER,
    description="dense bi-encoder retriever (shared or twin transformer encoders), InfoNCE with in-batch "
                "negatives, recall@k over all passages",
    smoke={"model": {"d_model": 16, "n_heads": 2, "n_layers": 1},
           "data": {"name": "pydoc_retrieval", "passage_tokens": 24, "n_train": 30, "batch_size": 8}},
)
class Retriever(PretrainedEncoderMixin, LitlabModule):
    def __init__(
        self,
        vocab_size: VocabSize,
        max_len: MaxLen,
        vocab_signature: str,
        pretrained: str | None = None,  # a bert_mlm checkpoint/run id: initialises the encoder(s)
        shared: bool = True,  # one encoder for queries and passages; False: twin encoders
        pooling: Pooling = "mean",
        proj_dim: Annotated[int, Range(ge=1, le=65_536)] | None = None,  # None: no projection
        temperature: Temperature = 0.05,  # tau in s(q, p) / tau
        d_model: Width = 128,
        n_heads: Heads = 4,
        n_layers: Layers = 2,
        d_ff: FFWidth = None,
        dropout: Dropout = 0.1,
        norm_first: bool = False,
        backend: Backend = "sdpa",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = BiEncoder(vocab_size, max_len, shared=shared, pooling=pooling, proj_dim=proj_dim,
                             **encoder_args(d_model, n_heads, n_layers, d_ff, dropout, norm_first, backend))
        self.recall = torch.nn.ModuleDict({f"at{k}": stage_means() for k in RECALL_KS})
        self.mrr, self.train_acc = stage_means(), stage_means()
        self._index_emb: torch.Tensor | None = None  # (N, E), encoded at each val/test epoch start

    def pretrained_targets(self):
        targets = {"query_encoder": self.net.query_encoder}
        if self.net.passage_encoder is not None:
            targets["passage_encoder"] = self.net.passage_encoder
        return targets, {name: "net.encoder." for name in targets}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net.encode_queries(ids)  # (B, T) -> (B, E)

    def training_step(self, batch, batch_idx):
        queries, passages, sources = batch  # (B, Tq), (B, Tp): row i of each a positive pair; (B,)
        q, p = self.net.encode_queries(queries), self.net.encode_passages(passages)
        loss = info_nce(q, p, self.hparams.temperature, sources)
        in_batch_top1 = ((q @ p.T).argmax(1) == torch.arange(len(q), device=q.device)).float()
        self.train_acc["train_"].update(in_batch_top1)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True)
        self.log("train/acc", self.train_acc["train_"], on_step=False, on_epoch=True)
        return loss

    def _encode_index(self) -> None:
        self._index_emb = self.net.encode_index(datamodule_index(self))

    def on_validation_epoch_start(self):
        self._encode_index()

    def on_test_epoch_start(self):
        self._encode_index()

    def _eval_step(self, batch, stage: str) -> None:
        queries, gold = batch  # (B, Tq), (B,) rows of the index
        scores = self(queries) @ self._index_emb.T  # (B, N) cosine similarities
        ranks = gold_ranks(scores, gold)
        loss = F.cross_entropy(scores / self.hparams.temperature, gold)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, prog_bar=stage == "val")
        for k in RECALL_KS:
            metric = self.recall[f"at{k}"][f"{stage}_"]
            metric.update((ranks < k).float())
            self.log(f"{stage}/recall_at_{k}", metric, on_epoch=True, prog_bar=stage == "val" and k == 5)
        self.mrr[f"{stage}_"].update(1.0 / (ranks + 1).float())
        self.log(f"{stage}/mrr", self.mrr[f"{stage}_"], on_epoch=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")
