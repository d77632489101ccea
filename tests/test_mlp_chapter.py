"""Chapter 1-2 (mlp, perceptron, uat): construction, shapes, penalties, the perceptron rule by hand,
and real learning checks with a plain lightning.Trainer on small local data."""

import math
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from litlab import registry
from litlab.chapters.mlp.module import MLPClassifier, PerceptronClassifier, UATRegressor
from litlab.chapters.mlp.nets import MLP, Perceptron
from litlab.config import OptimConfig, SchedulerConfig

CHAPTER = "1-2 MLPs and optimisation"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train several times faster on one thread (and do not fight other processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def trainer(max_epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)


def loaders(x, y, splits=(0.7, 0.15), batch_size=64, seed=0):
    """(train, val, test) DataLoaders over a seeded random split of the tensors x, y."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    a, b = int(splits[0] * len(y)), int((splits[0] + splits[1]) * len(y))
    parts = perm[:a], perm[a:b], perm[b:]
    return [DataLoader(TensorDataset(x[i], y[i]), batch_size=batch_size, shuffle=k == 0,
                       generator=torch.Generator().manual_seed(seed)) for k, i in enumerate(parts)]


def separable(n=400, d=5, k=3, margin=0.3, seed=0):
    """Points labelled by a random linear classifier, keeping those at least `margin` from a boundary."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(k, d, generator=g), torch.randn(k, generator=g)
    x = torch.randn(4 * n, d, generator=g) * 2
    s = x @ w.T + b
    top2 = s.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > margin if k > 2 else s[:, 0].abs() > margin
    x, s = x[keep][:n], s[keep][:n]
    y = s.argmax(1) if k > 2 else (s[:, 0] > 0).long()
    return x, y


def test_registered_with_chapter_and_smoke():
    for name in ("mlp", "perceptron", "uat"):
        entry = registry.MODELS[name]
        assert entry.chapter == CHAPTER and entry.description and entry.smoke["data"]["name"]


# ---------------------------------------------------------------- MLP
@pytest.mark.parametrize("hidden", [[], [7], [32, 16, 8]])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu"])
@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
def test_mlp_depth_width_activation_norm(hidden, activation, norm):
    m = MLPClassifier(input_shape=[1, 8, 8], num_classes=10, hidden=hidden, activation=activation, norm=norm,
                      dropout=0.2)
    assert m(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    linears = [x for x in m.net.layers if isinstance(x, nn.Linear)]
    assert [lin.out_features for lin in linears] == [*hidden, 10]
    assert linears[0].in_features == 64
    norm_type = {"none": None, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[norm]
    n_norms = sum(isinstance(x, (nn.BatchNorm1d, nn.LayerNorm)) for x in m.net.layers)
    assert n_norms == (len(hidden) if norm_type else 0)
    assert sum(isinstance(x, nn.Dropout) for x in m.net.layers) == len(hidden)
    assert all((lin.bias is None) == (norm == "batch") for lin in linears[:-1])


def test_init_matches_activation():
    torch.manual_seed(0)
    relu = MLP(1000, [1000], 10, activation="relu").layers[1].weight
    tanh = MLP(1000, [1000], 10, activation="tanh").layers[1].weight
    assert relu.std().item() == pytest.approx(math.sqrt(2 / 1000), rel=0.02)  # Kaiming: 2 / fan_in
    assert tanh.std().item() == pytest.approx(5 / 3 * math.sqrt(2 / 2000), rel=0.02)  # Xavier, tanh gain


def test_l1_l2_penalty_is_the_hand_computed_sum_over_weight_matrices():
    m = MLPClassifier(input_shape=[6], num_classes=3, hidden=[4], norm="layer", l1=0.01, l2=0.1)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(0.5)
    # weights: 6*4 + 4*3 = 36 entries of 0.5; biases and LayerNorm parameters do not count
    assert m.penalty().item() == pytest.approx(0.01 * 36 * 0.5 + 0.5 * 0.1 * 36 * 0.25)
    assert MLPClassifier(input_shape=[6], num_classes=3).penalty() == 0.0
    m.penalty().backward()  # differentiable, reaches the weights only
    assert m.net.layers[1].weight.grad is not None and m.net.layers[1].bias.grad is None


def test_mlp_learns_digits():
    from litlab.data.digits import DigitsDataModule

    L.seed_everything(0)
    data = DigitsDataModule(batch_size=64)  # stratified split, standardised pixels
    model = MLPClassifier(**data.info(), hidden=[128, 64], l2=1e-4)
    model.optim_config = OptimConfig(name="adam", lr=3e-3, scheduler=SchedulerConfig(name="cosine"))
    start = time.perf_counter()
    t = trainer(max_epochs=15)
    t.fit(model, datamodule=data)
    assert t.callback_metrics["train/l2"] > 0
    (result,) = t.test(model, datamodule=data, verbose=False)
    assert time.perf_counter() - start < 20
    assert result["test/acc"] >= 0.95, result  # measured 0.98


# ---------------------------------------------------------------- perceptron
def test_binary_perceptron_online_update_by_hand():
    p = Perceptron(in_features=2, num_classes=2)
    x, y = torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([1, 0])
    y_hat = p.train_online(x, y, lr=0.5)
    # x1: s = 0 -> y_hat = 0, y = 1: w = 0 + 0.5 (1 - 0) [1, 2] = [0.5, 1], b = 0.5
    # x2: s = 0.5*3 - 1*1 + 0.5 = 1 > 0 -> y_hat = 1, y = 0: w = [0.5, 1] - 0.5 [3, -1] = [-1, 1.5], b = 0
    assert y_hat.tolist() == [0, 1]
    assert p.weight.tolist() == [[-1.0, 1.5]] and p.bias.tolist() == [0.0]


def test_binary_perceptron_batch_update_by_hand():
    p = Perceptron(in_features=2, num_classes=2)
    x, y = torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([1, 0])
    p.update(x, y, p(x).argmax(1), lr=0.5)  # both scored with w = 0: only x1 is a mistake
    assert p.weight.tolist() == [[0.5, 1.0]] and p.bias.tolist() == [0.5]


def test_multiclass_perceptron_update_by_hand():
    p = Perceptron(in_features=2, num_classes=3)
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([2])
    p.train_online(x, y, lr=1.0)
    # all scores 0 -> argmax = class 0 (wrong): W[2] += x, W[0] -= x, b[2] += 1, b[0] -= 1
    assert p.weight.tolist() == [[-1.0, -2.0], [0.0, 0.0], [1.0, 2.0]]
    assert p.bias.tolist() == [-1.0, 0.0, 1.0]
    p.train_online(x, y, lr=1.0)  # now correct: no change
    assert p.weight.tolist() == [[-1.0, -2.0], [0.0, 0.0], [1.0, 2.0]]


@pytest.mark.parametrize("k", [2, 4])
def test_vectorised_online_equals_the_sample_loop(k):
    x, y = torch.randn(60, 3), torch.randint(0, k, (60,))  # not separable: many mistakes
    fast, slow = Perceptron(3, k), Perceptron(3, k)
    fast_hat = fast.train_online(x, y, lr=0.3)
    slow_hat = []
    for i in range(len(y)):  # Rosenblatt, literally
        y_hat = slow(x[i:i + 1]).argmax(1)
        slow_hat.append(int(y_hat))
        if y_hat != y[i]:
            slow.update(x[i:i + 1], y[i:i + 1], y_hat, lr=0.3)
    assert fast_hat.tolist() == slow_hat
    torch.testing.assert_close(fast.weight, slow.weight)
    torch.testing.assert_close(fast.bias, slow.bias)


@pytest.mark.parametrize("k, mode", [(2, "online"), (3, "online"), (3, "batch")])
def test_perceptron_converges_on_separable_data(k, mode):
    L.seed_everything(0)
    x, y = separable(k=k)
    train, val, test = loaders(x, y, batch_size=32)
    model = PerceptronClassifier(input_shape=[5], num_classes=k, lr=1.0, mode=mode)
    assert all(not p.requires_grad for p in model.parameters())
    t = trainer(max_epochs=40 if mode == "online" else 100)
    t.fit(model, train, val)
    # Novikoff: finitely many mistakes on separable data, so the last epochs make none
    assert t.callback_metrics["train/errors"].item() == 0
    assert t.callback_metrics["train/acc"].item() == 1.0
    x_train, y_train = (torch.cat(t) for t in zip(*train))  # one pass over the shuffled loader
    assert torch.equal(model(x_train).argmax(1), y_train)
    (result,) = t.test(model, test, verbose=False)
    assert result["test/acc"] >= 0.9 and result["test/loss"] == pytest.approx(1 - result["test/acc"])
    assert "net.weight" in model.state_dict()
    assert t.global_step == t.max_epochs * len(train)  # one (no-op) optimiser step per batch: checkpoints save


def test_perceptron_converges_on_blobs():
    from litlab.data.synthetic import BlobsDataModule

    L.seed_everything(0)
    data = BlobsDataModule(n_features=3, num_classes=4, separation=0.2, batch_size=16)
    model = PerceptronClassifier(**data.info())
    t = trainer(max_epochs=10)
    t.fit(model, datamodule=data)
    assert t.callback_metrics["train/errors"].item() == 0
    assert t.test(model, datamodule=data, verbose=False)[0]["test/acc"] == 1.0


# ---------------------------------------------------------------- universal approximation
def test_uat_fits_sine_and_plots():
    from litlab.data.synthetic import Function1DDataModule

    L.seed_everything(0)
    data = Function1DDataModule(fn="sin", batch_size=32)  # x ~ U(-pi, pi)
    model = UATRegressor(**data.info(), hidden_units=32)
    model.optim_config = OptimConfig(name="adam", lr=0.03, scheduler=SchedulerConfig(name="cosine"))
    t = trainer(max_epochs=30)
    t.fit(model, datamodule=data)
    fig = model.plot_fit()  # target_fn from the trainer's datamodule
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["target", "network (32 sigmoids)"]
    (result,) = t.test(model, datamodule=data, verbose=False)
    assert result["test/mse"] < 0.01, result  # measured ~0.002 (sin has variance 0.5)


def test_uat_logs_its_figure_at_the_end_of_fit(tmp_path):
    class FigureLogger(CSVLogger):
        def log_figure(self, figure, artifact_file):
            figures.append((figure, artifact_file))

    figures = []
    x = torch.linspace(-1, 1, 64).unsqueeze(1)
    train, val, _ = loaders(x, x.abs(), splits=(0.5, 0.5))
    model = UATRegressor(input_dim=1, output_dim=1, hidden_units=4)
    t = L.Trainer(max_epochs=1, logger=FigureLogger(tmp_path), enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    t.fit(model, train, val)
    (fig, name), = figures
    assert name == "plots/fit_vs_target.png"
    fig.savefig(tmp_path / "fit.png")  # a pyplot-free Figure still renders
    assert (tmp_path / "fit.png").stat().st_size > 1000
