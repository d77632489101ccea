"""Chapter 4 networks (plain nn.Modules, no Lightning): a sequence classifier for the recall task,
a character-level language model, and the per-time-step gradient probe dL/dh_t.

Tokens are embedded by an nn.Embedding, or one-hot encoded when `embedding` is None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litlab.chapters.rnn.cells import CellType, Recurrent, State


class TokenInput(nn.Module):
    """int64 (B, T) -> float (B, T, E): an embedding, or one-hot (E = vocab_size) when embedding is None."""

    def __init__(self, vocab_size: int, embedding: int | None):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embedding) if embedding else None
        self.size = embedding or vocab_size

    def forward(self, x: Tensor) -> Tensor:
        if self.embed is not None:
            return self.embed(x)
        return F.one_hot(x, self.vocab_size).to(torch.get_default_dtype())


class SequenceClassifier(nn.Module):
    """tokens (B, T) -> inputs (B, T, E) -> Recurrent -> last output h_T (B, H) -> linear -> logits (B, C)."""

    def __init__(self, vocab_size: int, num_classes: int, cell_type: CellType, hidden: int, num_layers: int = 1,
                 embedding: int | None = 16, fast: bool = True, nonlinearity: str = "tanh", forget_bias: float = 0.0):
        super().__init__()
        self.inputs = TokenInput(vocab_size, embedding)
        self.rnn = Recurrent(cell_type, self.inputs.size, hidden, num_layers, fast, nonlinearity=nonlinearity,
                             forget_bias=forget_bias)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        outputs, _ = self.rnn(self.inputs(x))  # (B, T, H)
        return self.head(outputs[:, -1])  # (B, C)


def grad_norm_by_time(net: SequenceClassifier, x: Tensor, y: Tensor) -> Tensor:
    """||dL/dh_t|| for t = 0..T-1 (mean over the batch of the per-example norm), (T,) float, where
    L is the mean cross-entropy of `net` on (x, y) and h_t the top layer's hidden state at step t.

    Runs the step-by-step layer (a slow twin with the same weights when `net.rnn` is fast), so that
    every h_t is a node of the graph, and takes torch.autograd.grad(L, [h_0, ..., h_{T-1}]): the
    same values as h_t.retain_grad() + L.backward() would leave in h_t.grad, without touching the
    parameters' .grad. Backpropagation through time multiplies dL/dh_{T-1} by the Jacobians
    dh_{t+1}/dh_t = diag(tanh'(.)) W_hh for a vanilla RNN: their product shrinks (or grows)
    geometrically in T - t, while the LSTM's additive cell path c_t = f_t * c_{t-1} + ... decays
    only by the forget gates.
    """
    rnn = net.rnn.twin(fast=False) if net.rnn.fast else net.rnn
    with torch.enable_grad():
        outputs, _, steps = rnn.unroll(net.inputs(x))
        top = rnn.cells[-1]
        hs = [top.hidden(s) for s in steps[-1]]  # T tensors (B, H)
        loss = F.cross_entropy(net.head(outputs[:, -1]), y)
        grads = torch.autograd.grad(loss, hs, allow_unused=True)
    return torch.stack([g.norm(dim=-1).mean() if g is not None else hs[0].new_zeros(())
                        for g in grads]).detach()


class CharLM(nn.Module):
    """Character language model: ids (B, T) -> inputs (B, T, E) -> dropout -> Recurrent (L layers,
    dropout between them) -> dropout -> linear -> next-character logits (B, T, V)."""

    def __init__(self, vocab_size: int, cell_type: CellType, hidden: int, num_layers: int = 1,
                 embedding: int | None = 64, dropout: float = 0.0, fast: bool = True, nonlinearity: str = "tanh",
                 forget_bias: float = 0.0):
        super().__init__()
        self.inputs = TokenInput(vocab_size, embedding)
        self.drop = nn.Dropout(dropout)
        self.rnn = Recurrent(cell_type, self.inputs.size, hidden, num_layers, fast, dropout=dropout,
                             nonlinearity=nonlinearity, forget_bias=forget_bias)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        outputs, state = self.rnn(self.drop(self.inputs(x)), state)  # (B, T, H)
        return self.head(self.drop(outputs)), state  # (B, T, V)

    @torch.no_grad()
    def generate(self, prompt: Tensor, length: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None, banned: tuple[int, ...] = (0,)) -> Tensor:
        """Sample `length` ids after `prompt` (P,) int64, P >= 1: feed the prompt, then each sampled
        character, carrying the recurrent state; p(c) = softmax(logits / temperature), temperature 0
        = greedy. Ids in `banned` (the unknown character) are never sampled. Returns (length,)."""
        was_training = self.training
        self.eval()
        logits, state = self(prompt.view(1, -1))
        out = []
        for _ in range(length):
            last = logits[0, -1].float()  # (V,)
            if banned:
                last[list(banned)] = float("-inf")
            if temperature == 0:
                nxt = last.argmax().view(1)
            else:
                nxt = torch.multinomial(F.softmax(last / temperature, dim=-1), 1, generator=generator)
            out.append(nxt)
            logits, state = self(nxt.view(1, 1), state)
        self.train(was_training)
        return torch.cat(out) if out else prompt.new_zeros(0)
