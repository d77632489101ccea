"""`litlab compare`, `litlab runs` filters, and the classifiers' confusion matrix.

Most checks use a store of hand-made runs (MlflowClient, known params and metric values), so the
expected table, filter results and best marks are known exactly; two real tiny runs check the
command end to end, the confusion matrix against scikit-learn on the reloaded model's predictions,
and `litlab.load()`.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from rich.console import Console

from helpers import MLP_DIGITS, QUICK
from litlab import compare as cmp
from litlab import runner, runs_table
from litlab.cli import main

# name -> (params, tags, {metric: [(step, value), ...]}, status)
FAKE = {
    "adam-fast": ({"model.name": "mlp", "optim.lr": "0.01", "data.batch_size": "64", "tracking.run_name": "a"},
                  {"litlab.model": "mlp", "litlab.monitor": "val/acc", "litlab.mode": "max"},
                  {"val/acc": [(10, 0.5), (20, 0.8), (30, 0.9)], "test/acc": [(30, 0.91)], "test/loss": [(30, 0.30)]},
                  "FINISHED"),
    "adam-slow": ({"model.name": "mlp", "optim.lr": "0.001", "data.batch_size": "64", "tracking.run_name": "b"},
                  {"litlab.model": "mlp", "litlab.monitor": "val/acc", "litlab.mode": "max"},
                  {"val/acc": [(10, 0.4), (20, 0.6), (30, 0.7)], "test/acc": [(30, 0.72)], "test/loss": [(30, 0.80)]},
                  "FINISHED"),
    "cnn": ({"model.name": "cnn", "optim.lr": "0.01", "data.batch_size": "64", "tracking.run_name": "c"},
            {"litlab.model": "cnn", "litlab.monitor": "val/loss", "litlab.mode": "min"},
            {"val/loss": [(10, 0.6), (20, 0.3)], "test/acc": [(20, 0.95)], "test/loss": [(20, 0.20)]},
            "FAILED"),
    "sweep-parent": ({"sweep.n_trials": "2"}, {"litlab.sweep": "true"}, {"best_value": [(1, 0.9)]}, "FINISHED"),
}


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory):
    """The FAKE runs in experiment 'demo', created in this order (so 'sweep-parent' is newest).
    One store for the module: creating an MLflow SQLite store takes seconds."""
    tracking_uri = f"sqlite:///{tmp_path_factory.mktemp('fake_store')}/mlflow.db"
    c = MlflowClient(tracking_uri=tracking_uri)
    exp = c.create_experiment("demo")
    ids = {}
    for name, (params, tags, metrics, status) in FAKE.items():
        run = c.create_run(exp, run_name=name, tags=tags)
        now = int(time.time() * 1000)
        c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                    metrics=[Metric(k, v, now, s) for k, pts in metrics.items() for s, v in pts])
        c.set_terminated(run.info.run_id, status)
        ids[name] = run.info.run_id
        time.sleep(0.01)  # distinct start times: newest-first order is defined
    return tracking_uri, ids


def _text(data) -> str:
    buf = io.StringIO()
    cmp.render(data, Console(file=buf, width=200, force_terminal=False))
    return buf.getvalue()


def _row(text: str, label: str) -> str:
    return next(line for line in text.splitlines() if line.strip("│ ").startswith(label))


def _cells(text: str, label: str) -> list[str]:
    return [cell.strip() for cell in _row(text, label).split("│")[2:-1]]


# ------------------------------------------------------------------------------------ compare
def test_compare_shows_differing_params_and_marks_the_best(fake_store):
    uri, ids = fake_store
    c = MlflowClient(tracking_uri=uri)
    runs = cmp.find_runs(c, [ids["adam-fast"], ids["adam-slow"], ids["cnn"]], None)
    data = cmp.comparison(runs)
    # the params that differ, and only those (run names always differ: not a param worth showing)
    assert data["params"] == {"model.name": ["mlp", "mlp", "cnn"], "optim.lr": ["0.01", "0.001", "0.01"]}
    rows = {m["name"]: m for m in data["metrics"]}
    # the monitored metrics of the runs, then the test metrics
    assert [m["name"] for m in data["metrics"]] == ["val/acc", "val/loss", "test/acc", "test/loss"]
    assert rows["val/acc"]["values"] == [0.9, 0.7, None] and rows["val/acc"]["best"] == {0}
    assert rows["val/loss"]["direction"] == "min" and rows["val/loss"]["best"] == {2}
    assert rows["test/acc"]["best"] == {2} and rows["test/loss"]["direction"] == "min" and rows["test/loss"]["best"] == {2}
    text = _text(data)
    assert "data.batch_size" not in text and "tracking.run_name" not in text
    assert "(* = best of the row)" in text
    assert _cells(text, "test/acc") == ["0.91", "0.72", "0.95 *"]
    assert _cells(text, "val/acc") == ["0.9 *", "0.7", "-"]
    assert "FAILED" in text  # a run that did not finish says so in its header


def test_compare_on_a_terminal_highlights_in_colour_without_stars(fake_store):
    uri, ids = fake_store
    c = MlflowClient(tracking_uri=uri)
    data = cmp.comparison(cmp.find_runs(c, [ids["adam-fast"], ids["adam-slow"]], None))
    buf = io.StringIO()
    cmp.render(data, Console(file=buf, width=200, force_terminal=True, color_system="standard"))
    out = buf.getvalue()
    assert "\x1b[1;32m0.91\x1b[0m" in out  # bold green
    assert " *" not in out and "0.72" in out


def test_metric_direction_from_monitor_tags_then_names():
    class Run:
        def __init__(self, tags):
            self.data = type("D", (), {"tags": tags, "metrics": {}})()

    assert cmp.metric_direction([Run({"litlab.monitor": "val/score", "litlab.mode": "min"})], "val/score") == "min"
    for name, direction in [("test/acc", "max"), ("test/majority_acc", "max"), ("test/mse", "min"),
                            ("test/perplexity", "min"), ("test/error_rate", "min"), ("test/f1", "max"),
                            ("test/mean_return", "max"), ("test/fid", "min"), ("test/bits_per_dim", "min")]:
        assert cmp.metric_direction([], name) == direction, name


def test_compare_cli_by_experiment_prefix_and_user_errors(fake_store, capsys):
    uri, ids = fake_store
    assert main(["compare", "--experiment", "demo", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "adam-fast" in out and "cnn" in out and "sweep-parent" not in out  # a sweep's parent is no training run
    assert main(["compare", ids["adam-fast"][:8], ids["cnn"][:10], "--tracking-uri", uri]) == 0
    assert "model.name" in capsys.readouterr().out
    for argv, message in [
        ([ids["adam-fast"], "0" * 32], f"no run {'0' * 32} in "),
        ([ids["adam-fast"], "banana"], "'banana' is not a run id"),
        ([ids["adam-fast"], "--plot", "val/acx"], "did you mean val/acc"),
        ([ids["adam-fast"], "--metric", "test/acx"], "did you mean test/acc"),
        (["--experiment", "nope"], "no experiment 'nope'"),
        ([], "give RUN_IDs or --experiment NAME"),
        ([ids["adam-fast"], "--out", "x.png"], "--out: only with --plot"),
    ]:
        assert main(["compare", *argv, "--tracking-uri", uri]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("litlab compare: error: ") and message in err[0], (argv, err)


def test_overlay_plot_has_each_runs_history_and_readable_labels(fake_store, tmp_path):
    uri, ids = fake_store
    c = MlflowClient(tracking_uri=uri)
    runs = cmp.find_runs(c, [ids["adam-fast"], ids["adam-slow"]], None)
    fig = cmp.metric_figure(c, runs, "val/acc")
    ax = fig.axes[0]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {f"adam-fast ({ids['adam-fast'][:8]})": ([10, 20, 30], [0.5, 0.8, 0.9]),
                     f"adam-slow ({ids['adam-slow'][:8]})": ([10, 20, 30], [0.4, 0.6, 0.7])}
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "val/acc"
    assert "val/acc" in ax.get_title() and "higher is better" in ax.get_title()
    out = tmp_path / "acc.png"
    assert main(["compare", ids["adam-fast"], ids["adam-slow"], "--plot", "val/acc", "--out", str(out),
                 "--tracking-uri", uri]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ runs filters
def _names(runs) -> list[str]:
    return [r.info.run_name for r in runs]


def test_runs_filters_and_sort_match_a_plain_python_filter(fake_store):
    uri, _ = fake_store

    def fetch(**kw):
        return _names(runs_table.fetch_runs(uri, "demo", 20, **kw))

    assert fetch(where=["test/acc>0.9"]) == ["cnn", "adam-fast"]  # newest first
    assert fetch(where=["test/acc >= 0.91", "test/loss<0.25"]) == ["cnn"]
    assert fetch(where=["test/acc==0.72"]) == ["adam-slow"]
    assert fetch(where=["test/loss <= 0.3"]) == ["cnn", "adam-fast"]
    assert fetch(model="cnn") == ["cnn"]
    assert fetch(status="failed") == ["cnn"]
    assert fetch(model="mlp", status="FINISHED") == ["adam-slow", "adam-fast"]
    # sorted by a metric; the sweep parent (no test/acc) comes last either way
    by_acc = sorted((n for n, f in FAKE.items() if "test/acc" in f[2]), key=lambda n: -FAKE[n][2]["test/acc"][0][1])
    assert fetch(sort="test/acc") == [*by_acc, "sweep-parent"]
    assert fetch(sort="test/acc", asc=True) == [*by_acc[::-1], "sweep-parent"]
    assert fetch(where=["test/acc>0.99"]) == []


def test_runs_cli_filters_and_one_line_user_errors(fake_store, capsys):
    uri, ids = fake_store
    assert main(["runs", "--tracking-uri", uri, "--where", "test/acc>0.9", "--sort", "test/acc"]) == 0
    out = capsys.readouterr().out
    assert out.index(ids["cnn"]) < out.index(ids["adam-fast"]) and ids["adam-slow"] not in out
    assert main(["runs", "--tracking-uri", uri, "--where", "test/acc>0.99"]) == 0
    assert "no runs match" in capsys.readouterr().out
    for argv, message in [
        (["--where", "test/acc>>0.9"], "expected METRIC OP NUMBER"),
        (["--where", "__import__('os').system('true')"], "expected METRIC OP NUMBER"),
        (["--where", "test/acc > abc"], "expected METRIC OP NUMBER"),
        (["--where", "test/acx>0.5"], "did you mean test/acc"),
        (["--sort", "test/acx"], "--sort: no run logged a metric 'test/acx'; did you mean test/acc"),
        (["--status", "DONE"], "one of FINISHED, FAILED, RUNNING, KILLED"),
        (["--model", "mpl"], "no run of model 'mpl'; models in this store: cnn, mlp"),
        (["--model", "x' or '1'='1"], "a model name has only"),
    ]:
        assert main(["runs", "--tracking-uri", uri, *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)


@settings(max_examples=60, deadline=None)
@given(metric=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}(/[a-z0-9_]{1,8})?", fullmatch=True),
       op=st.sampled_from([">", ">=", "<", "<=", "=="]),
       value=st.floats(allow_nan=False, allow_infinity=False, width=32), space=st.sampled_from(["", " "]))
def test_where_parses_every_well_formed_condition(metric, op, value, space):
    cond = runs_table.parse_where(f"{metric}{space}{op}{space}{value!r}")
    assert (cond.metric, cond.op, cond.value) == (metric, op, value)
    assert cond.to_filter() == f"metrics.`{metric}` {'=' if op == '==' else op} {float(value)!r}"


# ------------------------------------------------------------------------------------ confusion matrix
def test_accuracy_with_confusion_matches_torchmetrics_and_sklearn():
    from sklearn.metrics import confusion_matrix
    from torchmetrics.classification import MulticlassAccuracy

    from litlab.module import AccuracyWithConfusion

    g = torch.Generator().manual_seed(0)
    metric, reference = AccuracyWithConfusion(5), MulticlassAccuracy(num_classes=5, average="micro")
    ys, ps = [], []
    for _ in range(4):
        logits, y = torch.randn(33, 5, generator=g), torch.randint(0, 5, (33,), generator=g)
        logits[y == 2, 2] += 2  # class 2 easy: the matrix is not uniform
        metric.update(logits, y)
        reference.update(logits, y)
        ys.append(y)
        ps.append(logits.argmax(1))
    metric.update(torch.tensor([1, 1, 4]), torch.tensor([1, 0, 4]))  # labels instead of logits (the perceptron)
    reference.update(torch.tensor([1, 1, 4]), torch.tensor([1, 0, 4]))
    ys.append(torch.tensor([1, 0, 4]))
    ps.append(torch.tensor([1, 1, 4]))
    expected = confusion_matrix(torch.cat(ys).numpy(), torch.cat(ps).numpy(), labels=range(5))
    assert np.array_equal(metric.matrix().numpy(), expected)
    assert torch.isclose(metric.compute(), reference.compute())
    seq = AccuracyWithConfusion(3)  # logits (B, K, T) over a sequence
    seq.update(torch.tensor([[[5.0, 0.0], [0.0, 5.0], [0.0, 0.0]]]), torch.tensor([[0, 2]]))
    assert seq.matrix().tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]


def test_confusion_figure_is_readable():
    from litlab.module import class_names
    from litlab.plots import confusion_matrix_figure

    cm = torch.tensor([[5, 1, 0], [0, 3, 2], [0, 0, 4]])
    fig = confusion_matrix_figure(cm, ["cat", "dog", "bird"], title="test confusion matrix")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "bird"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "bird"]
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(v for v in cm.flatten().tolist() if v)
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert "accuracy 0.800 on 15 samples" in ax.get_title()

    class WithNames:
        class_names = ("a", "b")

    assert class_names(WithNames(), 2) == ["a", "b"] and class_names(None, 3) == ["0", "1", "2"]
    assert class_names(WithNames(), 3) == ["0", "1", "2"]  # names that do not fit are not used


def test_real_runs_compare_confusion_matrix_and_load(tracking_uri, tmp_path, capsys):
    """Two tiny MLP runs: the confusion matrix the test stage accumulated equals scikit-learn's on
    the predictions of the module litlab.load() returns; compare lists the param that differs."""
    from lightning.pytorch.callbacks import Callback
    from sklearn.metrics import confusion_matrix

    import litlab
    from litlab.data.digits import DigitsDataModule

    class KeepMatrix(Callback):
        def on_test_epoch_end(self, trainer, pl_module):
            self.matrix = pl_module.metrics["test_acc"].matrix().clone()

    keep = KeepMatrix()
    quick = QUICK + ["trainer.max_epochs=1", "tracking.system_metrics=false"]
    a = runner.run(MLP_DIGITS, quick, tracking_uri=tracking_uri, callbacks=[keep])
    b = runner.run(MLP_DIGITS, quick + ["optim.lr=0.01"], tracking_uri=tracking_uri)
    c = MlflowClient(tracking_uri=tracking_uri)
    assert "plots/confusion_matrix.png" in {f.path for f in c.list_artifacts(a.run_id, "plots")}

    module = litlab.load(a.run_id, tracking_uri=tracking_uri)
    dm = DigitsDataModule()
    dm.setup("test")
    x, y = dm.test_set.x, dm.test_set.y  # (270, 1, 8, 8), (270,)
    with torch.no_grad():
        pred = module(x).argmax(-1)
    assert np.array_equal(keep.matrix.numpy(), confusion_matrix(y.numpy(), pred.numpy(), labels=range(10)))
    assert abs((pred == y).float().mean().item() - a.metrics["test/acc"]) < 1e-6

    capsys.readouterr()
    assert main(["compare", a.run_id, b.run_id, "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert "optim.lr" in _row(out, "optim.lr") and "test/acc" in out and "*" in _row(out, "test/acc")
    for r in (a, b):  # the monitored metric's best value (the best checkpoint's) is a metric of its own
        assert c.get_run(r.run_id).data.metrics["best/val/acc"] == pytest.approx(r.best_score)
    assert "*" in _row(out, "best/val/acc (max)")  # compared in the monitor's direction


# ------------------------------------------------------------------------------------ what the errors say
def test_a_prefix_that_matches_no_run_says_so(fake_store, capsys):
    uri, ids = fake_store
    assert main(["compare", "ffffffffff", ids["adam-fast"][:6], "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run whose id starts with 'ffffffffff' in " in err[0], err  # not "matches 0 runs"


def test_an_unknown_metric_lists_the_useful_names_first(fake_store, capsys):
    """Alphabetically, a real run's names start with a dozen lr-* and system/* ones: cut at 12-15,
    the list hid test/*, val/* and train/*."""
    from litlab.metric_names import logged_list

    uri, ids = fake_store
    for argv in (["runs", "--where", "zzz>1"], ["runs", "--sort", "zzz"],
                 *(["compare", ids["adam-fast"], ids["cnn"], ids["sweep-parent"], flag, "zzz"]
                   for flag in ("--plot", "--metric"))):
        assert main([*argv, "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "logged: test/acc, test/loss, val/acc, val/loss, best_value" in err[0], (argv, err)
    system = [f"system/{k}" for k in ("cpu_utilization_percentage", "disk_usage_megabytes", "network_receive_megabytes",
                                      "system_memory_usage_megabytes", "disk_available_megabytes")]
    lrs = [f"lr-Adam/pg{i}" for i in range(4)] + ["lr-Adam"]
    useful = ["test/acc", "test/loss", "val/acc", "val/loss", "best/val/acc", "train/loss_step", "train/loss_epoch",
              "train/acc"]
    text = logged_list([*system, *lrs, *useful, "epoch"])
    assert text.startswith("test/acc, test/loss, val/acc, val/loss, best/val/acc, train/acc, train/loss_epoch, "
                           "train/loss_step, epoch, lr-Adam,") and text.endswith(", ... (4 more)"), text
    assert logged_list(["system/cpu", "val/acc"]) == "val/acc, system/cpu"  # a short list is shown whole


def test_plot_out_without_extension_prints_the_file_written(fake_store, tmp_path, capsys):
    uri, ids = fake_store
    out = tmp_path / "outnoext"
    assert main(["compare", ids["adam-fast"], ids["adam-slow"], "--plot", "val/acc", "--out", str(out),
                 "--tracking-uri", uri]) == 0
    assert (tmp_path / "outnoext.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"plot of val/acc for 2 runs: {out}.png"
    for bad, message in [(tmp_path / "plot.xyz", "cannot write a .xyz file; give a name ending in one of "),
                         (tmp_path, "is a directory; give a file name")]:
        assert main(["compare", ids["adam-fast"], "--plot", "val/acc", "--out", str(bad), "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "plot.xyz").exists()
