"""Plain nn.Modules of chapter 1-2 (no Lightning): the MLP, the one-hidden-layer sigmoid network of
the universal approximation theorem, and the perceptron's linear scorer with its update rule."""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,  # negative slope 0.01
    "elu": nn.ELU,
    "gelu": nn.GELU,
}


def init_linear(layer: nn.Linear, activation: str | None) -> None:
    """Initialise `layer`, whose output goes through `activation` (None: a linear output layer).

    relu-family (relu, leaky_relu, elu, gelu): Kaiming/He normal, Var(w) = 2 / fan_in (leaky: 2 /
      ((1 + a^2) fan_in)), which keeps the activations' second moment constant through ReLU layers.
    sigmoid, tanh and the output layer: Xavier/Glorot uniform, Var(w) = gain^2 * 2 / (fan_in + fan_out),
      balancing forward and backward variance for activations that are linear around 0 (tanh gain
      5/3; sigmoid gain 1, its slope at 0 is 1/4 but it is kept in its near-linear range).
    Biases start at 0.
    """
    if activation in ("relu", "elu", "gelu"):
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    elif activation == "leaky_relu":
        nn.init.kaiming_normal_(layer.weight, a=0.01, nonlinearity="leaky_relu")
    else:
        gain = nn.init.calculate_gain("tanh") if activation == "tanh" else 1.0
        nn.init.xavier_uniform_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class MLP(nn.Module):
    """x (B, *input_shape) -> flatten (B, D) -> [Linear -> Norm -> activation -> Dropout] x len(hidden)
    -> Linear -> logits (B, out_features). hidden=[] is multinomial logistic regression.

    With norm="batch" the hidden Linear layers have no bias: BatchNorm subtracts the batch mean, which
    removes any constant bias exactly (its own shift beta takes that role).
    """

    def __init__(self, in_features: int, hidden: list[int], out_features: int, activation: str = "relu",
                 dropout: float = 0.0, norm: str = "none"):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            linear = nn.Linear(width, h, bias=norm != "batch")
            init_linear(linear, activation)
            layers.append(linear)
            if norm == "batch":
                layers.append(nn.BatchNorm1d(h))
            elif norm == "layer":
                layers.append(nn.LayerNorm(h))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        out = nn.Linear(width, out_features)
        init_linear(out, None)
        layers.append(out)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def weight_matrices(self) -> list[torch.Tensor]:
        """The Linear layers' weights: what the L1/L2 penalties act on (not biases, not norms)."""
        return [m.weight for m in self.layers if isinstance(m, nn.Linear)]


class SigmoidNet(nn.Module):
    """f(x) = W2 sigmoid(W1 x + b1) + b2: one hidden layer of `hidden_units` sigmoids, linear output.

    The universal approximation theorem (Cybenko 1989) says sums of this form approximate any
    continuous function on a compact set. Default PyTorch init (U(-1/sqrt(fan_in), 1/sqrt(fan_in))) puts
    the sigmoid steps x = -b/w spread over a few units around 0, which suits inputs of scale ~1-5.
    """

    def __init__(self, input_dim: int, hidden_units: int, output_dim: int):
        super().__init__()
        self.hidden = nn.Linear(input_dim, hidden_units)
        self.out = nn.Linear(hidden_units, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, input_dim) -> (B, output_dim)
        return self.out(torch.sigmoid(self.hidden(x)))


class Perceptron(nn.Module):
    """Linear scores s = W x + b with W (K, D), b (K,); trained by the perceptron rule, not gradients.

    num_classes == 2: K = 1, Rosenblatt's binary perceptron, y_hat = [w.x + b > 0];
    num_classes > 2:  K = C, the multi-class (Kesler) perceptron, y_hat = argmax_c (W x + b)_c.
    Parameters are nn.Parameters with requires_grad=False: in the state dict, out of autograd.
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        k = 1 if num_classes == 2 else num_classes
        self.weight = nn.Parameter(torch.zeros(k, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(k), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, *) -> logits (B, num_classes); binary: (0, s) so that argmax = [s > 0]."""
        s = x.flatten(1) @ self.weight.T + self.bias  # (B, K)
        if self.num_classes == 2:
            return torch.cat([torch.zeros_like(s), s], dim=1)
        return s

    def delta(self, y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        """Update coefficients (B, K), zero rows for correct samples.

        binary:      y - y_hat in {-1, 0, 1}                (w <- w + lr (y - y_hat) x)
        multi-class: onehot(y) - onehot(y_hat)              (W[y] += lr x, W[y_hat] -= lr x)
        """
        if self.num_classes == 2:
            return (y - y_hat).to(self.weight.dtype).unsqueeze(1)
        eye = torch.eye(self.num_classes, dtype=self.weight.dtype, device=self.weight.device)
        return eye[y] - eye[y_hat]

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor, lr: float) -> None:
        """W <- W + lr * delta^T X,  b <- b + lr * sum_i delta_i   (x (B, D), y and y_hat (B,)).

        With one sample this is exactly Rosenblatt's rule; with a batch, the sum of the rule over the
        batch's mistakes, all evaluated with the same W (batch perceptron).
        """
        d = self.delta(y, y_hat)  # (B, K)
        self.weight.add_(d.T @ x.flatten(1).to(self.weight.dtype), alpha=lr)
        self.bias.add_(d.sum(0), alpha=lr)

    @torch.no_grad()
    def train_online(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """Present the samples one by one in order, updating after each mistake (Rosenblatt 1958).

        Returns y_hat (B,): the prediction each sample got when presented (before its own update).
        Vectorised exactly: score every remaining sample with the current W, jump to the first
        mistake, update, repeat; correct samples in between cause no update, so this is the same as
        the sample loop with (mistakes + 1) matrix products instead of B.
        """
        x = x.flatten(1)
        y_hat = torch.empty_like(y)
        i, n = 0, len(y)
        while i < n:
            pred = self(x[i:]).argmax(1)  # (n - i,) with the current W
            wrong = (pred != y[i:]).nonzero()
            if len(wrong) == 0:
                y_hat[i:] = pred
                break
            j = i + int(wrong[0])
            y_hat[i:j + 1] = pred[: j - i + 1]
            self.update(x[j:j + 1], y[j:j + 1], y_hat[j:j + 1], lr)
            i = j + 1
        return y_hat


def flat_size(shape) -> int:
    return int(math.prod(shape))
