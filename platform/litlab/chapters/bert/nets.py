"""BERT (Devlin et al. 2019) as plain nn.Modules: the encoder, the pretraining heads, a classifier.

Input representation: E = LayerNorm(E_token[x_t] + E_position[t] + E_segment[s_t]), dropout, then
a stack of TransformerBlocks (chapters/transformer/layers.py). BERT's blocks are post-LN,
h = LN(h + Sublayer(h)) (norm_first=False, the default here); with pre-LN (norm_first=True) a final
LayerNorm closes the stack. Padding ([PAD] = 0) is masked out of every attention.

Heads:
- masked LM: logits = LN(gelu(W h)) E_token^T + b, computed only at the selected positions; the
  output matrix is tied to the token embedding (as in BERT). With `max_predictions` = P (the most
  positions a row selects, which the data guarantees) each row gives P slots: its selected
  positions, then unselected ones whose label is IGNORE (weight 0, as BERT's masked_lm_weights).
  B x P slots is a fixed shape; without P the head runs on the M selected positions, and M must be
  read back from the device every step;
- pooler: p = tanh(W h_[CLS]), shared by next-sentence prediction (Linear(D, 2)) and the
  fine-tuned classifier (dropout + Linear(D, C)).

MLM loss: L = -(1/|M|) sum_{i in M} log p(x_i | x~), M = the selected positions (labels != -100);
unselected positions contribute nothing, not even to the normaliser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litlab.chapters.transformer.layers import TransformerBlock
from litlab.chapters.transformer.positional import LearnedPositionalEmbedding
from litlab.data.corpus import IGNORE, PAD

ENCODER_ARGS = ("vocab_size", "max_len", "d_model", "n_heads", "n_layers", "d_ff", "norm_first")


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the positions whose label is not IGNORE; logits (..., V), labels (...).
    0 (with a gradient path) when nothing is selected, instead of cross_entropy's nan."""
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    # the mean over the selected positions as sum / count: no `if any selected` read from the device
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp_min(1)


class BertEncoder(nn.Module):
    """ids (B, T) int64, segments (B, T) | None -> hidden states (B, T, D)."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int = 128, n_heads: int = 4, n_layers: int = 2,
                 d_ff: int | None = None, dropout: float = 0.1, norm_first: bool = False, n_segments: int = 2,
                 backend: str = "sdpa", causal: bool = False):
        super().__init__()
        self.token = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.position = LearnedPositionalEmbedding(max_len, d_model)
        self.segment = nn.Embedding(n_segments, d_model)
        self.embed_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_ff or 4 * d_model, dropout=dropout, norm_first=norm_first,
                             causal=causal, backend=backend)
            for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        for emb in (self.token, self.segment):  # BERT's initialiser: N(0, 0.02)
            nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.token.weight[PAD].zero_()

    def forward(self, ids: Tensor, segments: Tensor | None = None) -> Tensor:
        segments = torch.zeros_like(ids) if segments is None else segments
        x = self.position(self.token(ids)) + self.segment(segments)  # (B, T, D)
        x = self.dropout(self.embed_norm(x))
        padding = ids == PAD  # (B, T) True = padding: no position attends to it
        for block in self.blocks:
            x = block(x, key_padding_mask=padding)
        return self.final_norm(x)


class Pooler(nn.Module):
    """p = tanh(W h_[CLS]): (B, T, D) -> (B, D)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class MLMHead(nn.Module):
    """h (M, D) -> logits (M, V) = LN(gelu(W h)) E^T + b, E the (tied) token embedding."""

    def __init__(self, token_embedding: nn.Embedding):
        super().__init__()
        d = token_embedding.embedding_dim
        self.transform = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        self.embedding = token_embedding  # shared, not copied: its gradient comes from both ends
        self.bias = nn.Parameter(torch.zeros(token_embedding.num_embeddings))

    def forward(self, h: Tensor) -> Tensor:
        return self.transform(h) @ self.embedding.weight.T + self.bias


def prediction_slots(labels: Tensor, max_predictions: int) -> Tensor:
    """labels (B, T) -> (B, min(P, T)) positions per row: the selected ones (label != IGNORE) in
    order, then the first unselected ones. A row with more than P selected positions loses the last."""
    unselected = (labels == IGNORE).to(torch.uint8)
    return unselected.argsort(dim=1, stable=True)[:, :max_predictions]


class BertForPretraining(nn.Module):
    """Encoder + masked-LM head (+ pooler and next-sentence head when nsp)."""

    def __init__(self, vocab_size: int, max_len: int, nsp: bool = True, max_predictions: int | None = None,
                 **encoder_kwargs):
        super().__init__()
        self.encoder = BertEncoder(vocab_size, max_len, **encoder_kwargs)
        d = self.encoder.token.embedding_dim
        self.mlm = MLMHead(self.encoder.token)
        self.pooler = Pooler(d) if nsp else None
        self.nsp = nn.Linear(d, 2) if nsp else None
        self.max_predictions = max_predictions

    def forward(self, ids: Tensor, segments: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> (MLM logits (N, V), their targets (N,) (IGNORE on an empty slot), next-sentence logits
        (B, 2) or None). N = B x P slots (prediction_slots, row by row) with max_predictions = P,
        else the M selected positions in row-major order."""
        h = self.encoder(ids, segments)  # (B, T, D)
        if self.max_predictions is None:
            selected = labels != IGNORE  # (B, T): a boolean index, so M is read from the device
            h_scored, targets = h[selected], labels[selected]  # (M, D), (M,)
        else:
            slots = prediction_slots(labels, self.max_predictions)  # (B, P)
            index = slots.unsqueeze(-1).expand(-1, -1, h.shape[-1])  # (B, P, D)
            h_scored, targets = h.gather(1, index).flatten(0, 1), labels.gather(1, slots).flatten()
        mlm_logits = self.mlm(h_scored)  # (N, V): the head runs only where the loss looks
        nsp_logits = self.nsp(self.pooler(h)) if self.nsp is not None else None
        return mlm_logits, targets, nsp_logits


def mean_pool(h: Tensor, ids: Tensor) -> Tensor:
    """The mean of h (B, T, D) over the non-padding positions of ids (B, T) -> (B, D)."""
    keep = (ids != PAD).unsqueeze(-1).to(h.dtype)
    return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class BertClassifier(nn.Module):
    """[CLS] text [SEP] ids (B, T) -> class logits (B, C): encoder, pooling (BERT's tanh pooler on
    h_[CLS], or the mean of the hidden states over the real tokens), dropout, Linear(D, C)."""

    def __init__(self, vocab_size: int, max_len: int, num_classes: int, dropout: float = 0.1,
                 pooling: str = "cls", **encoder_kwargs):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.encoder = BertEncoder(vocab_size, max_len, dropout=dropout, **encoder_kwargs)
        d = self.encoder.token.embedding_dim
        self.pooling = pooling
        self.pooler = Pooler(d) if pooling == "cls" else None
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d, num_classes))

    def forward(self, ids: Tensor) -> Tensor:
        h = self.encoder(ids)  # (B, T, D)
        return self.head(self.pooler(h) if self.pooler is not None else mean_pool(h, ids))
