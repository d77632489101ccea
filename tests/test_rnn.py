"""Chapter 4, recurrent networks: hand-written cells == torch's modules, fast == slow, vanishing
gradients (tanh RNN vs LSTM), gradient clipping, the recall and text_chars data, rnn_recall and
char_lm end to end (metrics, plot and text artifacts). Nothing downloads."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from litlab import runner
from litlab.chapters.rnn.cells import GRUCell, LSTMCell, Recurrent, RNNCell
from litlab.chapters.rnn.nets import SequenceClassifier, grad_norm_by_time
from litlab.config import OptimConfig
from litlab.data.sequence_tasks import RecallDataModule, recall_examples
from litlab.data.text import CharVocab, TextCharsDataModule
from litlab.errors import UserError

TOL = {"atol": 1e-5, "rtol": 1e-5}
TORCH_CELLS = {"rnn": (RNNCell, nn.RNNCell), "lstm": (LSTMCell, nn.LSTMCell), "gru": (GRUCell, nn.GRUCell)}
TORCH_LAYERS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def _as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def _close(a, b) -> None:
    for x, y in zip(_as_tuple(a), _as_tuple(b), strict=True):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("cell_type", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("batch, input_size, hidden", [(1, 1, 1), (3, 5, 7), (8, 16, 4)])
def test_cells_equal_torch_cells_with_the_same_weights(cell_type, batch, input_size, hidden):
    torch.manual_seed(0)
    ours_cls, torch_cls = TORCH_CELLS[cell_type]
    ref = torch_cls(input_size, hidden)
    ours = ours_cls(input_size, hidden)
    ours.load_state_dict(ref.state_dict())  # same names and layouts: weight_ih, weight_hh, bias_ih, bias_hh
    state = ours.init_state(batch)
    ref_state = None
    for _ in range(4):
        x = torch.randn(batch, input_size)
        state = ours.step(x, state)
        ref_state = ref(x, ref_state)
        _close(state, ref_state)
    torch.testing.assert_close(ours.hidden(state), _as_tuple(ref_state)[0], **TOL)


@pytest.mark.parametrize("cell_type, nonlinearity", [("rnn", "tanh"), ("rnn", "relu"), ("lstm", "tanh"), ("gru", "tanh")])
@pytest.mark.parametrize("num_layers, batch, steps, input_size, hidden", [(1, 2, 5, 3, 4), (2, 4, 7, 6, 5), (3, 1, 3, 2, 8)])
def test_layers_equal_torch_layers_both_ways(cell_type, nonlinearity, num_layers, batch, steps, input_size, hidden):
    torch.manual_seed(1)
    extra = {"nonlinearity": nonlinearity} if cell_type == "rnn" else {}
    ref = TORCH_LAYERS[cell_type](input_size, hidden, num_layers, batch_first=True, **extra)
    x = torch.randn(batch, steps, input_size)
    h0 = torch.randn(num_layers, batch, hidden)
    state0 = (h0, torch.randn(num_layers, batch, hidden)) if cell_type == "lstm" else h0
    ref_out, ref_final = ref(x, state0)
    for fast in (False, True):  # torch -> ours, from zero and from a given initial state
        ours = Recurrent(cell_type, input_size, hidden, num_layers, fast, nonlinearity=nonlinearity)
        ours.load_torch_state_dict(ref.state_dict())
        out, final = ours(x, state0)
        torch.testing.assert_close(out, ref_out, **TOL)
        _close(final, ref_final)
        _close(ours(x)[0], ref(x)[0])
    torch.manual_seed(2)  # ours -> torch
    ours = Recurrent(cell_type, input_size, hidden, num_layers, False, nonlinearity=nonlinearity)
    ref.load_state_dict(ours.torch_state_dict())
    _close(ours(x, state0)[1], ref(x, state0)[1])


@pytest.mark.parametrize("cell_type", ["rnn", "lstm", "gru"])
def test_fast_path_equals_slow_path_outputs_and_gradients(cell_type):
    x = torch.randn(3, 9, 4)
    layers = {}
    for fast in (False, True):
        torch.manual_seed(0)  # same seed -> same weights: both paths create and init them in torch's order
        layers[fast] = Recurrent(cell_type, 4, 6, num_layers=2, fast=fast, forget_bias=1.0)
    slow, fast = layers[False], layers[True]
    for k, v in slow.torch_state_dict().items():
        torch.testing.assert_close(v, fast.torch_state_dict()[k], atol=0, rtol=0)
    (out_s, fin_s), (out_f, fin_f) = slow(x), fast(x)
    torch.testing.assert_close(out_s, out_f, **TOL)
    _close(fin_s, fin_f)
    (out_s.square().sum() + _as_tuple(fin_s)[-1].sum()).backward()
    (out_f.square().sum() + _as_tuple(fin_f)[-1].sum()).backward()
    grads_f = dict(fast.torch_layer.named_parameters())
    for k, cell in enumerate(slow.cells):
        for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            torch.testing.assert_close(getattr(cell, p).grad, grads_f[f"{p}_l{k}"].grad, **TOL)
    twin = fast.twin(fast=False)  # and a twin of the other kind computes the same function
    torch.testing.assert_close(twin(x)[0], out_f, **TOL)
    if cell_type == "lstm":  # forget_bias went into b_if on both paths
        assert torch.all(slow.cells[0].bias_ih[6:12] > 1.0 - 1 / math.sqrt(6) - 1e-6)


def test_unroll_exposes_every_step_and_rejects_the_fast_path():
    layer = Recurrent("lstm", 3, 5, num_layers=2)
    out, final, steps = layer.unroll(torch.randn(2, 6, 3))
    assert out.shape == (2, 6, 5) and final[0].shape == final[1].shape == (2, 2, 5)
    assert len(steps) == 2 and len(steps[1]) == 6
    torch.testing.assert_close(steps[1][-1][0], out[:, -1])
    with pytest.raises(RuntimeError, match="twin"):
        Recurrent("gru", 3, 5, fast=True).unroll(torch.randn(2, 6, 3))


def test_vanishing_gradients_tanh_rnn_vs_lstm():
    """||dL/dh_0|| / ||dL/dh_{T-1}|| on the recall task at init: the tanh RNN's ratio is orders of
    magnitude smaller than the LSTM's (same seed, same data, same width)."""
    T = 20
    x, y = recall_examples(64, T, 8, 4, torch.Generator().manual_seed(0))
    ratio = {}
    for cell in ("rnn", "lstm"):
        torch.manual_seed(0)
        net = SequenceClassifier(12, 8, cell, hidden=64, embedding=16, fast=True, forget_bias=1.0)
        norms = grad_norm_by_time(net, x, y)
        assert norms.shape == (T + 1,) and torch.all(norms > 0)
        assert all(p.grad is None for p in net.parameters())  # the probe leaves .grad alone
        ratio[cell] = (norms[0] / norms[-1]).item()
    assert ratio["rnn"] < 1e-4 and ratio["rnn"] < 1e-2 * ratio["lstm"], ratio


def test_recall_data():
    dm = RecallDataModule(seq_len=7, num_symbols=5, num_noise=3, n_train=40, n_val=10, n_test=10, batch_size=8)
    assert dm.info() == {"vocab_size": 8, "num_classes": 5}
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 8) and y.shape == (8,)
    assert torch.equal(x[:, 0], y) and torch.all((x[:, 1:] >= 5) & (x[:, 1:] < 8))
    same = RecallDataModule(seq_len=7, noise="symbols", num_symbols=5)
    same.setup()
    xs, ys = same.train_set.tensors()
    assert same.info()["vocab_size"] == 5 and xs.max() < 5 and torch.equal(xs[:, 0], ys)


def test_gradient_clipping_applies(tmp_path):
    """trainer.gradient_clip_val rescales the gradients before the step; train/grad_norm is the norm before."""
    from litlab.chapters.rnn.module import RecallRNN

    clip = 1e-3
    seen = []

    class Check(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):  # .grad still holds the clipped gradient
            seen.append(torch.stack([p.grad.norm() for p in pl_module.parameters() if p.grad is not None]).norm())

    dm = RecallDataModule(seq_len=5, n_train=64, n_val=16, n_test=16, batch_size=16)
    model = RecallRNN(vocab_size=12, num_classes=8, cell="rnn", hidden=16, fast=False)
    model.optim_config = OptimConfig()
    trainer = L.Trainer(max_epochs=1, gradient_clip_val=clip, accelerator="cpu", logger=False, callbacks=[Check()],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert len(seen) == 4 and all(n <= clip * (1 + 1e-4) for n in seen)
    assert trainer.callback_metrics["train/grad_norm"] > 10 * clip  # before clipping
    assert torch.isfinite(trainer.callback_metrics["train/grad_ratio_log10"])


def test_recall_run_logs_the_gradient_plot(tracking_uri):
    from helpers import REPO
    from mlflow import MlflowClient

    result = runner.run(REPO / "experiments" / "rnn" / "recall_rnn.yaml",
                        ["data.seq_len=6", "data.n_train=128", "data.n_val=32", "data.n_test=32", "model.hidden=16",
                         "trainer.max_epochs=2", "model.plot_every_n_epochs=1", "tracking.system_metrics=false"],
                        tracking_uri=tracking_uri)
    assert result.status == "FINISHED" and 0 <= result.metrics["test/acc"] <= 1
    c = MlflowClient(tracking_uri)
    assert "plots/grad_norm_by_time.png" in [a.path for a in c.list_artifacts(result.run_id, "plots")]
    assert len(c.get_metric_history(result.run_id, "train/grad_ratio_log10")) == 2
    assert "train/grad_norm" in c.get_run(result.run_id).data.metrics


# ---------------------------------------------------------------- text
def test_char_vocab_round_trip_and_unknown():
    v = CharVocab.from_text("hello world")
    assert len(v) == 9 and v.itos[0] == "\ufffd"  # 8 characters + unknown
    ids = v.encode("hold w€")
    assert ids.dtype == torch.int64 and ids[-1] == 0 and (ids[:-1] > 0).all()
    assert v.decode(ids) == "hold w\ufffd"


def test_text_chars_pydoc_corpus_offline():
    dm = TextCharsDataModule(seq_len=50, batch_size=4)
    info = dm.info()
    assert 80 <= info["vocab_size"] <= 200
    dm.setup()
    n = sum(len(t) for t in dm.texts.values())
    assert n > 400_000 and abs(len(dm.texts["val"]) - 0.05 * n) < 2
    x, y = dm.train_set.tensors()
    assert x.shape == y.shape and x.shape[1] == 50 and x.shape[0] == (len(dm.texts["train"]) - 1) // 50
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])  # next-character targets
    assert dm.vocab.decode(x[0]) == dm.texts["train"][:50]


def test_text_chars_local_file_contiguous_split(tmp_path):
    text = "ab" * 450 + "XYZ" * 50  # the last 150 characters (val/test) hold letters never seen in training
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    dm = TextCharsDataModule(source=str(path), seq_len=10, val_fraction=0.1, test_fraction=0.1, batch_size=4)
    assert dm.info() == {"vocab_size": 3}  # unknown, a, b
    dm.setup()
    assert dm.texts["train"] + dm.texts["val"] + dm.texts["test"] == text
    assert len(dm.texts["train"]) == 840
    assert (dm.test_set.tensors()[0] == 0).all()  # X, Y, Z -> unknown
    with pytest.raises(UserError, match="not an existing text file"):
        TextCharsDataModule(source=str(tmp_path / "missing.txt")).info()
    with pytest.raises(UserError, match="seq_len"):
        TextCharsDataModule(source=str(path), seq_len=500).info()


def test_text_chars_local_hf_dataset_directory(tmp_path):
    import datasets

    folder = tmp_path / "hf"
    folder.mkdir()
    datasets.Dataset.from_dict({"body": ["first line of text"] * 30}).to_parquet(str(folder / "train.parquet"))
    dm = TextCharsDataModule(source=str(folder), text_column="body", seq_len=8)
    dm.setup()
    assert dm.texts["train"].startswith("first line of text\nfirst")
    with pytest.raises(UserError, match="text_column"):
        TextCharsDataModule(source=str(folder), seq_len=8).info()


def test_char_lm_learns_logs_bpc_and_a_sample(tracking_uri, tmp_path):
    from helpers import REPO
    from litlab.api import load
    from mlflow import MlflowClient

    path = tmp_path / "abc.txt"
    path.write_text("the cat sat on the mat. " * 300, encoding="utf-8")
    result = runner.run(REPO / "experiments" / "rnn" / "char_lm_pydoc.yaml",
                        [f"data.source={path}", "data.seq_len=24", "data.batch_size=16", "model.hidden=32",
                         "model.num_layers=1", "model.embedding=8", "model.sample_length=40", "optim.lr=0.02",
                         "trainer.max_epochs=3", "tracking.system_metrics=false"], tracking_uri=tracking_uri)
    assert result.status == "FINISHED"
    m = result.metrics
    assert m["test/bpc"] == pytest.approx(m["test/loss"] / math.log(2), rel=1e-4)
    assert m["test/bpc"] < 1.0  # log2(13) = 3.7 bits for a uniform guess over this text's characters
    c = MlflowClient(tracking_uri)
    assert {"val/bpc", "train/loss_step", "train/grad_norm"} <= set(c.get_run(result.run_id).data.metrics)
    sample = Path(c.download_artifacts(result.run_id, "samples/generated.txt", str(tmp_path))).read_text()
    assert "The " in sample and len(sample.split("\n\n", 1)[1]) >= 40
    model = load(result.run_id, tracking_uri=tracking_uri)  # the vocabulary is in the state_dict
    assert model.generate("the c", length=10, temperature=0).startswith("the cat sat")
