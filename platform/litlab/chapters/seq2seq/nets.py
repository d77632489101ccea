"""Encoder-decoder networks (plain nn.Modules): an RNN encoder, and an RNN decoder that sees either
only the encoder's final state (the fixed-size bottleneck of Sutskever et al. 2014) or, at every
step, a context vector c_i = sum_j alpha_ij h_j over all encoder states (attention).

Notation: source x_1..x_S -> encoder states h_j (B, S, E); decoder state s_i (B, H); output y_i.
    alpha_ij = softmax_j(e_ij) over the UNPADDED source positions (padding gets exactly 0)
    bahdanau (additive, Bahdanau et al. 2015):   e_ij = v^T tanh(W_s s_{i-1} + W_h h_j)
        s_i = RNN([E y_{i-1}; c_i], s_{i-1}),  logits_i = W_o [s_i; c_i; E y_{i-1}]
    luong (multiplicative "general", Luong et al. 2015):   e_ij = s_i^T W h_j
        s_i = RNN(E y_{i-1}, s_{i-1}),  h~_i = tanh(W_c [c_i; s_i]),  logits_i = W_s h~_i
        (no "input feeding": s_i does not depend on c_i, so training runs the decoder RNN over the
        whole target at once and attends for all steps in one batched product)
    none:  s_i = RNN(E y_{i-1}, s_{i-1}),  s_0 = bridge(final encoder state),  logits_i = W_o s_i

Recurrences use torch's nn.GRU / nn.LSTM (cuDNN on a GPU); the encoder packs the padded batch so
that its final state is the one at each sequence's true last token. Packing needs the lengths on the
host: give them there (the LightningModule keeps `src_len` on the host when it moves a batch), and
`pack_by_length` / `pad_by_length` pack and unpack without copying an index between host and device
(torch's own functions do, and wait for the GPU), so a training step never waits for it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from litlab.data.seq2seq_tasks import BOS, EOS, PAD

Cell = Literal["gru", "lstm"]
State = Tensor | tuple[Tensor, Tensor]  # GRU: h (L, B, H); LSTM: (h, c)

_RNN = {"gru": nn.GRU, "lstm": nn.LSTM}


def _top(state: State) -> Tensor:
    """The last layer's hidden state s (B, H)."""
    return (state[0] if isinstance(state, tuple) else state)[-1]


def pack_by_length(x: Tensor, lengths: Tensor) -> PackedSequence:
    """pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False) for x (B, S, D) on any
    device and lengths (B,) on the host, without the host sync that call makes on a GPU: it copies
    the sort order to the device with a blocking copy, which waits for every queued kernel. The
    order goes over asynchronously here (from pageable memory, staged at once); its inverse is
    computed on the device. The same PackedSequence: the RNN puts its final state back in batch order."""
    lengths, order = torch.sort(lengths.cpu().long(), descending=True)  # (B,), host
    order = order.to(x.device, non_blocking=True)
    packed = pack_padded_sequence(x.index_select(0, order), lengths, batch_first=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return PackedSequence(packed.data, packed.batch_sizes, order, inverse)


def pad_by_length(packed: PackedSequence, total_length: int) -> Tensor:
    """pad_packed_sequence(packed, batch_first=True, total_length=total_length)[0] (B, S, *) without
    its host sync: it also returns the lengths in batch order, indexed by the order copied back
    from the device. Padded in the packed (sorted) order, then put back in batch order on the device."""
    by_length, _ = pad_packed_sequence(PackedSequence(packed.data, packed.batch_sizes), batch_first=True,
                                       total_length=total_length)
    return by_length.index_select(0, packed.unsorted_indices)


class Encoder(nn.Module):
    """Embedding + (bi)directional multi-layer GRU/LSTM over a padded batch.

    forward(src (B, S), src_len (B,) on the host) -> states h (B, S, E), E = H * directions (0 at padding),
    and the decoder's initial state (L, B, H): the final state, for a bidirectional encoder both
    directions' final states through a bridge s_0 = tanh(W_b [h_fwd; h_bwd]).
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int, cell: Cell,
                 bidirectional: bool, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.drop = nn.Dropout(dropout)
        self.rnn = _RNN[cell](embed_dim, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional,
                              dropout=dropout if num_layers > 1 else 0.0)
        self.num_layers, self.bidirectional = num_layers, bidirectional
        self.out_dim = hidden_size * (2 if bidirectional else 1)
        self.bridge = nn.Linear(2 * hidden_size, hidden_size) if bidirectional else None

    def _bridge(self, h: Tensor) -> Tensor:
        if self.bridge is None:
            return h
        h = h.view(self.num_layers, 2, *h.shape[1:])  # (L, directions, B, H)
        return torch.tanh(self.bridge(torch.cat([h[:, 0], h[:, 1]], dim=-1)))  # (L, B, H)

    def forward(self, src: Tensor, src_len: Tensor) -> tuple[Tensor, State]:
        x = self.drop(self.embed(src))  # (B, S, D)
        packed = pack_by_length(x, src_len)  # src_len on the device costs a sync here: .cpu() waits
        out, state = self.rnn(packed)
        out = pad_by_length(out, total_length=src.shape[1])  # (B, S, E)
        state = tuple(self._bridge(s) for s in state) if isinstance(state, tuple) else self._bridge(state)
        return out, state


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """softmax over the last dim (source positions) where mask is True; exactly 0 elsewhere.
    scores (B, T, S), mask (B, S); every row must have at least one True."""
    return F.softmax(scores.masked_fill(~mask[:, None, :], float("-inf")), dim=-1)


class AdditiveAttention(nn.Module):
    """Bahdanau: e_ij = v^T tanh(W_s s_{i-1} + W_h h_j). `keys(h)` = W_h h_j, computed once per source."""

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int):
        super().__init__()
        self.W_s = nn.Linear(query_dim, attn_dim, bias=False)
        self.W_h = nn.Linear(key_dim, attn_dim)
        self.v = nn.Linear(attn_dim, 1, bias=False)

    def keys(self, h: Tensor) -> Tensor:
        return self.W_h(h)  # (B, S, A)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """query (B, T, Q), keys (B, S, A), values h (B, S, E), mask (B, S) ->
        context (B, T, E), alpha (B, T, S)."""
        e = self.v(torch.tanh(self.W_s(query)[:, :, None, :] + keys[:, None, :, :])).squeeze(-1)  # (B, T, S)
        alpha = masked_softmax(e, mask)
        return alpha @ values, alpha  # c_i = sum_j alpha_ij h_j


class GeneralAttention(nn.Module):
    """Luong "general": e_ij = s_i^T W h_j. `keys(h)` = W h_j (B, S, Q), computed once per source."""

    def __init__(self, query_dim: int, key_dim: int):
        super().__init__()
        self.W = nn.Linear(key_dim, query_dim, bias=False)

    def keys(self, h: Tensor) -> Tensor:
        return self.W(h)  # (B, S, Q)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        e = query @ keys.transpose(1, 2)  # (B, T, Q) @ (B, Q, S) -> (B, T, S)
        alpha = masked_softmax(e, mask)
        return alpha @ values, alpha


class Seq2Seq(nn.Module):
    """Encoder-decoder with attention "none" | "bahdanau" | "luong" (equations in the module doc).

    forward(src, src_len, tgt_in) -> logits (B, T, V), alpha (B, T, S) or None   [teacher forcing]
    greedy(src, src_len, max_len) -> tokens (B, L), alpha (B, L, S) or None      [L <= max_len]
    """

    def __init__(self, vocab_size: int, embed_dim: int = 32, hidden_size: int = 128, num_layers: int = 1,
                 cell: Cell = "gru", bidirectional: bool = True, attention: str = "bahdanau",
                 attention_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.attention_kind = attention
        self.encoder = Encoder(vocab_size, embed_dim, hidden_size, num_layers, cell, bidirectional, dropout)
        E, H = self.encoder.out_dim, hidden_size
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.drop = nn.Dropout(dropout)
        rnn_in = embed_dim + (E if attention == "bahdanau" else 0)
        self.rnn = _RNN[cell](rnn_in, H, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        if attention == "bahdanau":
            self.attn = AdditiveAttention(H, E, attention_dim or H)
            self.out = nn.Linear(H + E + embed_dim, vocab_size)  # W_o [s_i; c_i; E y_{i-1}]
        elif attention == "luong":
            self.attn = GeneralAttention(H, E)
            self.combine = nn.Linear(E + H, H)  # W_c [c_i; s_i]
            self.out = nn.Linear(H, vocab_size)
        elif attention == "none":
            self.attn = None
            self.out = nn.Linear(H, vocab_size)
        else:
            raise ValueError(f"attention must be none, bahdanau or luong, got {attention!r}")

    # ------------------------------------------------------------ pieces
    def encode(self, src: Tensor, src_len: Tensor) -> tuple[dict[str, Tensor], State]:
        h, state = self.encoder(src, src_len)  # (B, S, E)
        mem = {"h": h, "mask": src != PAD}  # mask (B, S): True at real tokens
        if self.attn is not None:
            mem["keys"] = self.attn.keys(h)
        return mem, state

    def _readout(self, s: Tensor, mem: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """none / luong, for any number of steps: s (B, T, H) -> logits (B, T, V), alpha (B, T, S)."""
        if self.attn is None:
            return self.out(s), None
        c, alpha = self.attn(s, mem["keys"], mem["h"], mem["mask"])  # attend with s_i (Luong)
        return self.out(torch.tanh(self.combine(torch.cat([c, s], -1)))), alpha

    def step(self, y_prev: Tensor, state: State, mem: dict[str, Tensor]) -> tuple[Tensor, State, Tensor | None]:
        """One decoder step: y_prev (B,) -> logits (B, V), new state, alpha (B, S) or None."""
        y_emb = self.drop(self.embed(y_prev))[:, None, :]  # (B, 1, D)
        if self.attention_kind == "bahdanau":
            s_prev = _top(state)[:, None, :]  # s_{i-1} (B, 1, H)
            c, alpha = self.attn(s_prev, mem["keys"], mem["h"], mem["mask"])  # (B, 1, E), (B, 1, S)
            s, state = self.rnn(torch.cat([y_emb, c], -1), state)  # s_i (B, 1, H)
            logits = self.out(torch.cat([s, c, y_emb], -1))
        else:
            s, state = self.rnn(y_emb, state)
            logits, alpha = self._readout(s, mem)
        return logits[:, 0], state, (alpha[:, 0] if alpha is not None else None)

    # ------------------------------------------------------------ teacher forcing / greedy
    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor | None]:
        mem, state = self.encode(src, src_len)
        if self.attention_kind != "bahdanau":  # s_i does not depend on c_i: whole target at once
            y_emb = self.drop(self.embed(tgt_in))  # (B, T, D)
            s, _ = self.rnn(y_emb, state)  # (B, T, H); steps after EOS see PAD, their loss is ignored
            return self._readout(s, mem)
        logits, alphas = [], []
        for i in range(tgt_in.shape[1]):  # Bahdanau: c_i needs s_{i-1}, one step at a time
            lg, state, alpha = self.step(tgt_in[:, i], state, mem)
            logits.append(lg)
            alphas.append(alpha)
        return torch.stack(logits, 1), torch.stack(alphas, 1)  # (B, T, V), (B, T, S)

    @torch.no_grad()
    def greedy(self, src: Tensor, src_len: Tensor, max_len: int) -> tuple[Tensor, Tensor | None]:
        """y_i = argmax p(y | y_<i, x), fed back, until every sequence has produced EOS (or max_len
        steps). Positions after a sequence's EOS hold PAD (and alpha 0)."""
        mem, state = self.encode(src, src_len)
        B = src.shape[0]
        y = torch.full((B,), BOS, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        tokens, alphas = [], []
        for _ in range(max_len):
            logits, state, alpha = self.step(y, state, mem)
            y = logits.argmax(-1).masked_fill(done, PAD)  # (B,)
            tokens.append(y)
            if alpha is not None:
                alphas.append(alpha.masked_fill(done[:, None], 0.0))
            done = done | (y == EOS)
            if bool(done.all()):  # one host sync per step: decoding is sequential anyway
                break
        return torch.stack(tokens, 1), (torch.stack(alphas, 1) if alphas else None)
