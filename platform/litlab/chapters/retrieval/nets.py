"""Dense retrieval and retrieval-augmented generation as plain nn.Modules and functions.

Bi-encoder (DPR, Karpukhin et al. 2020): a query q and a passage p are encoded separately by
transformer encoders (one shared encoder, or twin encoders), pooled ([CLS] or the mean over
non-padding tokens), optionally projected, and L2-normalised; relevance is the cosine
s(q, p) = <e_q, e_p>. Passages are encoded once into an index; retrieval = top-k of s over it.

InfoNCE with in-batch negatives (van den Oord et al. 2018; DPR): for B pairs (q_i, p_i),
    L = -(1/B) sum_i log( exp(s(q_i, p_i) / tau) / sum_j exp(s(q_i, p_j) / tau) ),
the other B - 1 passages of the batch being the negatives of q_i (those of q_i's own source passage
excluded: a repeat is no negative).

recall@k = fraction of queries whose gold passage is among the k best-scoring ones of the whole
index; rank = number of passages scoring STRICTLY higher than the gold one (ties count in the
query's favour), so recall@k = mean(rank < k), MRR = mean(1 / (rank + 1)).

RAG generator: a causal transformer reading
    [CLS] p_1 ... p_k q [SEP] a      (each p_i a fixed-width slot: [CLS] passage [SEP] [PAD]...)
and trained to predict the answer tokens a only; segment 0 = the retrieved context, 1 = the
query and answer. With no retrieval the slots are all [PAD] (masked out of attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litlab.chapters.bert.nets import BertEncoder
from litlab.data.corpus import CLS, IGNORE, PAD, SEP


def info_nce(queries: Tensor, passages: Tensor, temperature: float, sources: Tensor | None = None) -> Tensor:
    """queries (B, E), passages (B, E), row i of each a positive pair -> scalar InfoNCE loss.
    `sources` (B,): the passage each pair comes from; a column j != i from the same source as row i
    is not a negative of q_i (it is dropped from the softmax), so repeats in a batch do no harm."""
    logits = queries @ passages.T / temperature  # (B, B): s(q_i, p_j) / tau
    eye = torch.eye(len(queries), dtype=torch.bool, device=queries.device)
    if sources is not None:
        logits = logits.masked_fill((sources[:, None] == sources[None, :]) & ~eye, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


def gold_ranks(scores: Tensor, gold: Tensor) -> Tensor:
    """scores (Q, N), gold (Q,) -> (Q,) number of passages scoring strictly above the gold one."""
    gold_score = scores.gather(1, gold[:, None])  # (Q, 1)
    return (scores > gold_score).sum(1)


def recall_at_k(scores: Tensor, gold: Tensor, ks=(1, 5, 10)) -> dict[int, Tensor]:
    ranks = gold_ranks(scores, gold)
    return {k: (ranks < k).float().mean() for k in ks}


class BiEncoder(nn.Module):
    """Query and passage encoders (shared or twin) -> L2-normalised embeddings (B, E)."""

    def __init__(self, vocab_size: int, max_len: int, *, shared: bool = True, pooling: str = "mean",
                 proj_dim: int | None = None, **encoder_kwargs):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.pooling = pooling
        self.query_encoder = BertEncoder(vocab_size, max_len, **encoder_kwargs)
        self.passage_encoder = None if shared else BertEncoder(vocab_size, max_len, **encoder_kwargs)
        d = self.query_encoder.token.embedding_dim
        self.query_proj = nn.Linear(d, proj_dim) if proj_dim else nn.Identity()
        self.passage_proj = None if shared or not proj_dim else nn.Linear(d, proj_dim)

    def _pool(self, h: Tensor, ids: Tensor) -> Tensor:
        if self.pooling == "cls":
            return h[:, 0]
        keep = (ids != PAD).unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # mean over the real tokens (B, D)

    def encode_queries(self, ids: Tensor) -> Tensor:
        return F.normalize(self.query_proj(self._pool(self.query_encoder(ids), ids)), dim=-1)

    def encode_passages(self, ids: Tensor) -> Tensor:
        encoder = self.passage_encoder or self.query_encoder
        proj = self.passage_proj or self.query_proj
        return F.normalize(proj(self._pool(encoder(ids), ids)), dim=-1)

    @torch.no_grad()
    def encode_index(self, ids: Tensor, chunk: int = 256) -> Tensor:
        """All passages (N, W) -> (N, E), in chunks, without gradients."""
        return torch.cat([self.encode_passages(ids[i: i + chunk]) for i in range(0, len(ids), chunk)])


def wrap_query(query: Tensor) -> Tensor:
    """(B, Q) raw token ids -> (B, Q + 2) [CLS] query [SEP], the retriever's query input."""
    b = len(query)
    cls = query.new_full((b, 1), CLS)
    return torch.cat((cls, query, query.new_full((b, 1), SEP)), dim=1)


def rag_sequence(context: Tensor, query: Tensor, answer: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """context (B, k, W) passage slots, query (B, Q), answer (B, A) -> teacher-forced
    (inputs (B, T-1), segments (B, T-1), targets (B, T-1)) for [CLS] p_1..p_k q [SEP] a, T = 1 + kW + Q + 1 + A;
    targets are IGNORE except at the A positions that predict the answer."""
    b = len(query)
    ctx = torch.cat((query.new_full((b, 1), CLS), context.flatten(1)), dim=1)  # (B, 1 + kW)
    qa = torch.cat((query, query.new_full((b, 1), SEP), answer), dim=1)  # (B, Q + 1 + A)
    seq = torch.cat((ctx, qa), dim=1)
    segments = torch.cat((torch.zeros_like(ctx), torch.ones_like(qa)), dim=1)
    targets = seq[:, 1:].clone()
    targets[:, : -answer.shape[1]] = IGNORE
    return seq[:, :-1], segments[:, :-1], targets


class CausalGenerator(nn.Module):
    """A decoder-only transformer (causal BertEncoder, pre-LN by default) with a tied LM head:
    ids (B, T), segments (B, T) -> next-token logits (B, T, V), or (B, last, V) for the last
    `last` positions only (the answer: the head then skips the long retrieved context)."""

    def __init__(self, vocab_size: int, max_len: int, **encoder_kwargs):
        super().__init__()
        self.decoder = BertEncoder(vocab_size, max_len, causal=True, **encoder_kwargs)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, ids: Tensor, segments: Tensor | None = None, last: int | None = None) -> Tensor:
        h = self.decoder(ids, segments)  # (B, T, D)
        if last is not None:
            h = h[:, -last:]
        return h @ self.decoder.token.weight.T + self.bias
