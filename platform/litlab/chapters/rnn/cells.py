"""Recurrent cells written from the course equations, and a multi-layer `Recurrent` layer over them.

Plain nn.Modules (no Lightning). Every cell keeps torch's parameter layout, names and init, so its
weights copy to and from `nn.RNNCell` / `nn.LSTMCell` / `nn.GRUCell` with `load_state_dict`, and
layer k of a `Recurrent` to and from `weight_ih_l{k}`, ... of `nn.RNN` / `nn.LSTM` / `nn.GRU`:

    weight_ih (G*H, I)   weight_hh (G*H, H)   bias_ih (G*H,)   bias_hh (G*H,)

with G stacked gate blocks: G=1 (RNN), G=4 in the order i, f, g, o (LSTM), G=3 in the order r, z, n
(GRU). Each row block [k*H:(k+1)*H] holds one gate's W_i? (or W_h?, b_i?, b_h?).

Cell API (used by chapter 4 and by seq2seq):
    cell = LSTMCell(input_size, hidden_size)
    state = cell.init_state(batch_size)      # h (B, H), or (h, c) for the LSTM
    state = cell.step(x_t, state)            # x_t (B, I) -> the new state
    h = cell.hidden(state)                   # (B, H): what the layer outputs at this step

`Recurrent(cell_type, input_size, hidden_size, num_layers, fast)` runs a (B, T, I) batch and returns
outputs (B, T, H) (the last layer's h_t) and the final state in torch's format: h_n (L, B, H), or
(h_n, c_n) for the LSTM. fast=False unrolls the cells above in Python (slow, but every h_t is a
graph node: see `unroll`); fast=True runs torch's fused nn.RNN/nn.LSTM/nn.GRU (cuDNN on a GPU).
Both create and initialise their parameters in the same order, so for the same seed they hold the
same weights; `twin(fast=...)` copies a layer into the other kind.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CellType = Literal["rnn", "lstm", "gru"]
State = Tensor | tuple[Tensor, Tensor]  # h (B, H) or (h, c); per layer of a Recurrent: (L, B, H)


class _Cell(nn.Module):
    """Holds the four parameters of torch's layout; subclasses define `step_projected`."""

    gates = 1

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        g = self.gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(g, input_size))
        self.weight_hh = nn.Parameter(torch.empty(g, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(g))
        self.bias_hh = nn.Parameter(torch.empty(g))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch's init, in torch's order (weight_ih, weight_hh, bias_ih, bias_hh): U(-1/sqrt(H), 1/sqrt(H))
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        like = self.weight_hh
        return torch.zeros(batch_size, self.hidden_size, device=device or like.device, dtype=dtype or like.dtype)

    def hidden(self, state: State) -> Tensor:
        return state

    def project_input(self, x: Tensor) -> Tensor:
        """W_i? x + b_i? for all gates: (..., I) -> (..., G*H). A layer applies it to the whole
        sequence (B, T, I) in one matmul, leaving only the W_h? h_{t-1} products inside the loop."""
        return F.linear(x, self.weight_ih, self.bias_ih)

    def step_projected(self, gx: Tensor, state: State) -> State:
        raise NotImplementedError

    def step(self, x_t: Tensor, state: State | None = None) -> State:
        """One time step: x_t (B, I), state at t-1 (None = zeros) -> state at t."""
        if state is None:
            state = self.init_state(x_t.shape[0], x_t.device, x_t.dtype)
        return self.step_projected(self.project_input(x_t), state)

    forward = step


class RNNCell(_Cell):
    """Elman RNN: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)  (or relu)."""

    gates = 1

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: Literal["tanh", "relu"] = "tanh"):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size)

    def step_projected(self, gx: Tensor, h: Tensor) -> Tensor:
        pre = gx + F.linear(h, self.weight_hh, self.bias_hh)  # (B, H)
        return torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)


class LSTMCell(_Cell):
    """Long short-term memory (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000).

    `forget_bias` is added to b_if at init (torch: 0); 1.0 (Jozefowicz et al. 2015) starts the cell
    remembering: f_t ~ sigma(1) instead of 1/2, so gradients through c_t decay much more slowly.
    """

    gates = 4

    def __init__(self, input_size: int, hidden_size: int, forget_bias: float = 0.0):
        self.forget_bias = forget_bias
        super().__init__(input_size, hidden_size)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.forget_bias:
            with torch.no_grad():
                self.bias_ih[self.hidden_size:2 * self.hidden_size] += self.forget_bias

    def init_state(self, batch_size: int, device=None, dtype=None) -> tuple[Tensor, Tensor]:
        h = super().init_state(batch_size, device, dtype)
        return h, torch.zeros_like(h)

    def hidden(self, state: tuple[Tensor, Tensor]) -> Tensor:
        return state[0]

    def step_projected(self, gx: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state  # (B, H) each
        gates = gx + F.linear(h, self.weight_hh, self.bias_hh)  # (B, 4H)
        i, f, g, o = gates.chunk(4, dim=-1)  # (B, H) each, torch's block order
        i = torch.sigmoid(i)  # input gate   i_t = sigma(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)
        f = torch.sigmoid(f)  # forget gate  f_t = sigma(W_if x_t + b_if + W_hf h_{t-1} + b_hf)
        g = torch.tanh(g)  # candidate       g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)
        o = torch.sigmoid(o)  # output gate  o_t = sigma(W_io x_t + b_io + W_ho h_{t-1} + b_ho)
        c = f * c + i * g  # cell state      c_t = f_t * c_{t-1} + i_t * g_t   (the additive memory path)
        h = o * torch.tanh(c)  # hidden      h_t = o_t * tanh(c_t)
        return h, c


class GRUCell(_Cell):
    """Gated recurrent unit (Cho et al. 2014), in torch's convention (r applied after W_hn)."""

    gates = 3

    def step_projected(self, gx: Tensor, h: Tensor) -> Tensor:
        gh = F.linear(h, self.weight_hh, self.bias_hh)  # (B, 3H)
        xr, xz, xn = gx.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)  # reset gate   r_t = sigma(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
        z = torch.sigmoid(xz + hz)  # update gate  z_t = sigma(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
        n = torch.tanh(xn + r * hn)  # candidate   n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))
        return (1 - z) * n + z * h  # h_t = (1 - z_t) * n_t + z_t * h_{t-1}


CELLS: dict[str, type[_Cell]] = {"rnn": RNNCell, "lstm": LSTMCell, "gru": GRUCell}
TORCH_LAYERS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
_PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def make_cell(cell_type: CellType, input_size: int, hidden_size: int, *, nonlinearity: str = "tanh",
              forget_bias: float = 0.0) -> _Cell:
    if cell_type not in CELLS:
        raise ValueError(f"cell_type must be one of {', '.join(CELLS)}, got {cell_type!r}")
    if cell_type == "rnn":
        return RNNCell(input_size, hidden_size, nonlinearity)
    if cell_type == "lstm":
        return LSTMCell(input_size, hidden_size, forget_bias)
    return GRUCell(input_size, hidden_size)


class Recurrent(nn.Module):
    """A stack of `num_layers` recurrent layers over batch-first sequences.

    forward(x (B, T, I), state=None) -> (outputs (B, T, H), final state), state in torch's format:
    (L, B, H), or a pair of them for the LSTM; None = zeros. `dropout` acts on the outputs of every
    layer but the last (as in torch), in training only. fast=True: torch's fused layer
    (`self.torch_layer`); fast=False: the cells above (`self.cells`), unrolled in Python.
    """

    def __init__(self, cell_type: CellType, input_size: int, hidden_size: int, num_layers: int = 1,
                 fast: bool = False, *, dropout: float = 0.0, nonlinearity: Literal["tanh", "relu"] = "tanh",
                 forget_bias: float = 0.0):
        super().__init__()
        if cell_type not in CELLS:
            raise ValueError(f"cell_type must be one of {', '.join(CELLS)}, got {cell_type!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.cell_type, self.input_size, self.hidden_size = cell_type, input_size, hidden_size
        self.num_layers, self.fast, self.dropout = num_layers, fast, dropout
        self.nonlinearity, self.forget_bias = nonlinearity, forget_bias
        if fast:
            extra = {"nonlinearity": nonlinearity} if cell_type == "rnn" else {}
            # dropout=0 for one layer: torch warns that it would do nothing anyway
            self.torch_layer = TORCH_LAYERS[cell_type](input_size, hidden_size, num_layers, batch_first=True,
                                                       dropout=dropout if num_layers > 1 else 0.0, **extra)
            if cell_type == "lstm" and forget_bias:
                with torch.no_grad():
                    for k in range(num_layers):
                        getattr(self.torch_layer, f"bias_ih_l{k}")[hidden_size:2 * hidden_size] += forget_bias
        else:
            self.cells = nn.ModuleList(
                make_cell(cell_type, input_size if k == 0 else hidden_size, hidden_size, nonlinearity=nonlinearity,
                          forget_bias=forget_bias)
                for k in range(num_layers))

    def extra_repr(self) -> str:
        return f"{self.cell_type}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, fast={self.fast}"

    # ------------------------------------------------------------------ running
    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        if self.fast:
            return self.torch_layer(x, state)
        outputs, final, _ = self.unroll(x, state)
        return outputs, final

    def unroll(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, list[list[State]]]:
        """The slow path: (outputs (B, T, H), final state, steps), where steps[k][t] is layer k's
        state after step t, a node of the autograd graph: torch.autograd.grad(loss, h_t) (or
        h_t.retain_grad() before backward) gives the full dL/dh_t, through all later steps."""
        if self.fast:
            raise RuntimeError("unroll() needs the step-by-step layer: use twin(fast=False)")
        b, t_len, _ = x.shape
        layer_in = x  # (B, T, I), then (B, T, H)
        finals: list[State] = []
        steps: list[list[State]] = []
        for k, cell in enumerate(self.cells):
            s = cell.init_state(b, x.device, x.dtype) if state is None else self._layer_state(state, k)
            gx = cell.project_input(layer_in)  # (B, T, G*H): input half of every gate, all steps at once
            layer_steps = []
            for t in range(t_len):
                s = cell.step_projected(gx[:, t], s)
                layer_steps.append(s)
            layer_out = torch.stack([cell.hidden(s_t) for s_t in layer_steps], dim=1)  # (B, T, H)
            finals.append(s)
            steps.append(layer_steps)
            if self.dropout and self.training and k < self.num_layers - 1:
                layer_out = F.dropout(layer_out, self.dropout, training=True)
            layer_in = layer_out
        if self.cell_type == "lstm":
            final = (torch.stack([h for h, _ in finals]), torch.stack([c for _, c in finals]))  # (L, B, H) x 2
        else:
            final = torch.stack(finals)  # (L, B, H)
        return layer_in, final, steps

    def _layer_state(self, state: State, k: int) -> State:
        if self.cell_type == "lstm":
            h, c = state
            return h[k], c[k]
        return state[k]

    # ------------------------------------------------------------------ weights in torch's names
    def torch_state_dict(self) -> dict[str, Tensor]:
        """The parameters under nn.RNN/nn.LSTM/nn.GRU's names (weight_ih_l0, ...), either path."""
        if self.fast:
            return {k: v.detach() for k, v in self.torch_layer.state_dict().items()}
        return {f"{p}_l{k}": getattr(cell, p).detach() for k, cell in enumerate(self.cells) for p in _PARAMS}

    @torch.no_grad()
    def load_torch_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Copy weights from a torch layer's state_dict (same cell type, sizes and num_layers)."""
        if self.fast:
            self.torch_layer.load_state_dict(state_dict)
            return
        expected = {f"{p}_l{k}" for k in range(self.num_layers) for p in _PARAMS}
        if set(state_dict) != expected:
            raise KeyError(f"expected keys {sorted(expected)}, got {sorted(state_dict)}")
        for k, cell in enumerate(self.cells):
            for p in _PARAMS:
                getattr(cell, p).copy_(state_dict[f"{p}_l{k}"])

    def twin(self, fast: bool) -> Recurrent:
        """A new layer of the other (or same) kind holding a copy of these weights, same device/dtype."""
        other = Recurrent(self.cell_type, self.input_size, self.hidden_size, self.num_layers, fast,
                          dropout=self.dropout, nonlinearity=self.nonlinearity, forget_bias=self.forget_bias)
        w = next(self.parameters())
        other.to(device=w.device, dtype=w.dtype)
        other.load_torch_state_dict(self.torch_state_dict())
        other.train(self.training)
        return other
