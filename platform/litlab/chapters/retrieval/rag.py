"""`rag`: retrieval-augmented generation (Lewis et al. 2020, simplified) on data `pydoc_rag`.

Given a span q of the pydoc text, generate the `answer_tokens` tokens that follow it. A bi-encoder
retriever scores every passage of the corpus (the knowledge store, `index()` of the datamodule)
against [CLS] q [SEP]; its top_k passages fill the context slots of a causal generator
(nets.rag_sequence). The retriever is either loaded from a `retriever` run (frozen) or trained in
the same run with InfoNCE on (query, gold passage) pairs (loss = generator CE + retriever_weight *
InfoNCE); its index embeddings are then re-encoded every `index_refresh_steps` steps (a stale
index in between, as in REALM) and at every validation/test.

`train_context` is what the generator reads while training: "retrieved" (top_k), "oracle" (the
gold passage first, then the best other retrieved ones) or "none" (empty slots: a closed-book
generator, the baseline). Every validation/test measures all three contexts, so the benefit of
retrieval is read off one run: {stage}/acc_none < acc_retrieved <= acc_oracle (token accuracy of
the answer under teacher forcing), likewise loss_* and exact_* (all answer tokens right, i.e. what
greedy decoding would output). {stage}/loss is the loss under `train_context`, and
{stage}/recall_at_1 and recall_at_{top_k} measure the retriever on the same queries.
The test stores samples/rag_test.txt: queries, the top passage, the generated and true answers.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from litlab.chapters.bert.module import Backend, Dropout, FFWidth, Heads, Layers, MaxLen, VocabSize, Width, stage_means
from litlab.chapters.bert.pretrained import load_checkpoint, load_submodules, logger_tracking_uri
from litlab.chapters.retrieval.module import CHAPTER, Pooling, Temperature, datamodule_index, encoder_args
from litlab.chapters.retrieval.nets import BiEncoder, CausalGenerator, gold_ranks, info_nce, rag_sequence, wrap_query
from litlab.data.corpus import PAD
from litlab.module import LitlabModule
from litlab.registry import register_model
from litlab.schema import Range

CONTEXTS = ("none", "retrieved", "oracle")
Tokens = Annotated[int, Range(ge=1, le=4096)]


@register_model(
    "rag",
    chapter=CHAPTER,
    description="retrieval-augmented generation: bi-encoder top-k passages in the context of a causal "
                "transformer; reports accuracy without / with retrieved / with the oracle passage",
    smoke={"model": {"d_model": 16, "n_heads": 2, "n_layers": 1, "retriever_d_model": 16, "retriever_n_heads": 2},
           "data": {"name": "pydoc_rag", "passage_tokens": 24, "n_train": 30, "batch_size": 8}},
)
class RetrievalAugmentedGenerator(LitlabModule):
    def __init__(
        self,
        vocab_size: VocabSize,
        max_len: MaxLen,  # the data's passage_tokens + 3
        vocab_signature: str,
        query_tokens: Tokens,
        answer_tokens: Tokens,
        top_k: Annotated[int, Range(ge=1, le=64)] = 2,  # passages in the context
        train_context: Literal["retrieved", "oracle", "none"] = "retrieved",
        retriever: str | None = None,  # a `retriever` checkpoint or run id (frozen); None: trained here
        retriever_weight: Annotated[float, Range(ge=0, le=100)] = 1.0,
        index_refresh_steps: Annotated[int, Range(ge=1)] = 50,
        temperature: Temperature = 0.05,
        retriever_shared: bool = True,
        retriever_pooling: Pooling = "mean",
        retriever_proj_dim: Annotated[int, Range(ge=1, le=65_536)] | None = None,
        retriever_d_model: Width = 64,
        retriever_n_heads: Heads = 4,
        retriever_n_layers: Layers = 1,
        retriever_d_ff: FFWidth = None,
        retriever_norm_first: bool = False,
        d_model: Width = 128,  # the generator from here on
        n_heads: Heads = 4,
        n_layers: Layers = 2,
        d_ff: FFWidth = None,
        dropout: Dropout = 0.0,
        norm_first: bool = True,  # pre-LN, as GPT-2
        backend: Backend = "sdpa",
    ):
        super().__init__()
        self.save_hyperparameters()
        width = max_len - 1  # an index row: [CLS] passage [SEP] + padding
        self.retriever = BiEncoder(vocab_size, max_len, shared=retriever_shared, pooling=retriever_pooling,
                                   proj_dim=retriever_proj_dim,
                                   **encoder_args(retriever_d_model, retriever_n_heads, retriever_n_layers,
                                                  retriever_d_ff, 0.0, retriever_norm_first, backend))
        self.generator = CausalGenerator(vocab_size, 1 + top_k * width + query_tokens + 1 + answer_tokens,
                                         **encoder_args(d_model, n_heads, n_layers, d_ff, dropout, norm_first,
                                                        backend))
        self.trains_retriever = retriever is None
        if not self.trains_retriever:
            self.retriever.requires_grad_(False)
        self.acc = torch.nn.ModuleDict({c: stage_means() for c in CONTEXTS})
        self.exact = torch.nn.ModuleDict({c: stage_means() for c in CONTEXTS})
        self.recall_1, self.recall_k = stage_means(), stage_means()
        self._index_ids: torch.Tensor | None = None  # (N, W)
        self._index_emb: torch.Tensor | None = None  # (N, E)
        self._encoded_at = -1  # global step of the last index encoding
        self._retriever_loaded = False

    # ------------------------------------------------------------------ the retriever and its index
    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.trains_retriever and not self._retriever_loaded:
            self.load_retriever()

    def load_retriever(self, tracking_uri: str | None = None) -> None:
        h = self.hparams
        ckpt = load_checkpoint(h.retriever, tracking_uri or logger_tracking_uri(self), key="model.retriever")
        expected = {"vocab_signature": h.vocab_signature, "vocab_size": h.vocab_size, "max_len": h.max_len,
                    "shared": h.retriever_shared, "pooling": h.retriever_pooling, "proj_dim": h.retriever_proj_dim,
                    "d_model": h.retriever_d_model, "n_heads": h.retriever_n_heads, "n_layers": h.retriever_n_layers,
                    "d_ff": h.retriever_d_ff, "norm_first": h.retriever_norm_first}
        load_submodules({"retriever": self.retriever}, ckpt, {"retriever": "net."}, expected, key="model.retriever",
                        arg_prefix="retriever_")
        self._retriever_loaded = True

    def _refresh_index(self, force: bool) -> None:
        step = self.global_step if self._trainer is not None else 0
        stale = self._index_emb is None or (self.trains_retriever and step - self._encoded_at >= self.hparams.index_refresh_steps)
        if not (force or stale):
            return
        was_training = self.retriever.training
        self.retriever.eval()
        self._index_ids = datamodule_index(self)
        self._index_emb = self.retriever.encode_index(self._index_ids)
        self.retriever.train(was_training)
        self._encoded_at = step

    def _has_index(self) -> bool:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return dm is not None and hasattr(dm, "index")

    def contexts(self, kind: str, top: torch.Tensor, gold: torch.Tensor, index_ids: torch.Tensor) -> torch.Tensor:
        """(B, k, W) passage slots for a context kind; top (B, k) retrieved rows, gold (B,)."""
        if kind == "none":
            b, k = top.shape
            return index_ids.new_full((b, k, index_ids.shape[1]), PAD)
        if kind == "oracle":  # gold first, then the retrieved passages that are not the gold one
            not_gold = top != gold[:, None]
            order = torch.argsort((~not_gold).int(), dim=1, stable=True)  # non-gold first, in rank order
            top = torch.cat((gold[:, None], top.gather(1, order)[:, : top.shape[1] - 1]), dim=1)
        return index_ids[top]

    # ------------------------------------------------------------------ generation
    def generate_logits(self, context, query, answer) -> torch.Tensor:
        """Teacher-forced logits for the answer positions (B, A, V)."""
        ids, segments, _ = rag_sequence(context, query, answer)
        return self.generator(ids, segments, last=answer.shape[1])

    def forward(self, query, answer, context):
        return self.generate_logits(context, query, answer)

    def smoke_forward(self, batch):
        query, answer, _, passage = batch  # the gold passage as the only context
        return self.generate_logits(passage[:, None], query, answer)

    def _retrieve(self, q_emb, gold, passage):
        """-> (top (B, k), gold rows, index ids): over the datamodule's index, else over the batch."""
        if self._has_index():
            index_ids, index_emb = self._index_ids, self._index_emb
        else:  # no datamodule (a bare forward/backward check): the batch's passages are the index
            index_ids, index_emb = passage, self.retriever.encode_index(passage)
            gold = torch.arange(len(passage), device=passage.device)
        scores = q_emb @ index_emb.T  # (B, N)
        k = min(self.hparams.top_k, scores.shape[1])
        return scores, scores.topk(k, dim=1).indices, gold, index_ids

    def training_step(self, batch, batch_idx):
        query, answer, gold, passage = batch  # (B, Q), (B, A), (B,), (B, W)
        q_ids = wrap_query(query)
        loss = 0.0
        if self.trains_retriever:
            q_emb = self.retriever.encode_queries(q_ids)
            loss_ret = info_nce(q_emb, self.retriever.encode_passages(passage), self.hparams.temperature, gold)
            loss = loss + self.hparams.retriever_weight * loss_ret
            self.log("train/retriever_loss", loss_ret.detach(), on_step=False, on_epoch=True)
            q_emb = q_emb.detach()
        else:
            with torch.no_grad():
                q_emb = self.retriever.encode_queries(q_ids)
        if self._has_index():
            self._refresh_index(force=False)
        _, top, gold, index_ids = self._retrieve(q_emb, gold, passage)
        context = self.contexts(self.hparams.train_context, top, gold, index_ids)
        logits = self.generate_logits(context, query, answer)  # (B, A, V)
        loss_gen = F.cross_entropy(logits.flatten(0, 1), answer.flatten())
        self.log("train/generator_loss", loss_gen.detach(), on_step=False, on_epoch=True)
        loss = loss + loss_gen
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True)
        return loss

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self):
        self._refresh_index(force=True)

    def on_test_epoch_start(self):
        self._refresh_index(force=True)

    def _eval_step(self, batch, stage: str, batch_idx: int) -> None:
        query, answer, gold, passage = batch
        q_emb = self.retriever.encode_queries(wrap_query(query))
        scores, top, gold, index_ids = self._retrieve(q_emb, gold, passage)
        ranks = gold_ranks(scores, gold)
        log = dict(on_step=False, on_epoch=True)
        self.recall_1[f"{stage}_"].update((ranks < 1).float())
        self.log(f"{stage}/recall_at_1", self.recall_1[f"{stage}_"], **log)
        if self.hparams.top_k > 1:
            self.recall_k[f"{stage}_"].update((ranks < top.shape[1]).float())
            self.log(f"{stage}/recall_at_{self.hparams.top_k}", self.recall_k[f"{stage}_"], **log)
        if self.trains_retriever:
            self.log(f"{stage}/retriever_loss", F.cross_entropy(scores / self.hparams.temperature, gold),
                     sync_dist=True, **log)
        for kind in CONTEXTS:
            logits = self.generate_logits(self.contexts(kind, top, gold, index_ids), query, answer)
            loss = F.cross_entropy(logits.flatten(0, 1), answer.flatten())
            correct = logits.argmax(-1) == answer  # (B, A)
            self.acc[kind][f"{stage}_"].update(correct.float())
            self.exact[kind][f"{stage}_"].update(correct.all(1).float())
            self.log(f"{stage}/loss_{kind}", loss, sync_dist=True, **log)
            self.log(f"{stage}/acc_{kind}", self.acc[kind][f"{stage}_"], prog_bar=stage == "val" and kind != "oracle",
                     **log)
            self.log(f"{stage}/exact_{kind}", self.exact[kind][f"{stage}_"], **log)
            if kind == self.hparams.train_context:
                self.log(f"{stage}/loss", loss, sync_dist=True, **log)
            if stage == "test" and kind == "retrieved" and batch_idx == 0:
                self._log_samples(query, answer, logits.argmax(-1), index_ids[top[:, 0]], gold == top[:, 0])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test", batch_idx)

    def _log_samples(self, query, answer, predicted, top_passage, hit, n: int = 8) -> None:
        vocab = getattr(getattr(self._trainer, "datamodule", None), "corpus", None)
        if vocab is None or not any(hasattr(lg, "log_artifact") or hasattr(lg, "log_text") for lg in self.loggers):
            return
        from litlab.module import log_text

        v = vocab.vocab
        lines = []
        for i in range(min(n, len(query))):
            lines += [f"query:     {v.decode(query[i])}", f"answer:    {v.decode(answer[i])}",
                      f"generated: {v.decode(predicted[i])}",
                      f"top-1 passage ({'gold' if hit[i] else 'not gold'}): {v.decode(top_passage[i])}", ""]
        log_text(self, "\n".join(lines), "samples/rag_test.txt")
