"""litlab.sweep.report on small in-memory Optuna studies with known values (no training)."""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import shlex
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from PIL import Image
from rich.console import Console

from litlab import tracking
from litlab.sweep import report

optuna.logging.set_verbosity(optuna.logging.WARNING)

DIST = {"optim.lr": FloatDistribution(1e-4, 1e-1, log=True), "model.hidden": CategoricalDistribution(["[32]", "[128, 64]"])}
# (lr, hidden, state); the objective is known: (log10(lr) + 2)^2, plus 0.5 for the small model.
TRIALS = [
    (1e-2, "[32]", "COMPLETE"),       # 0: 0.5
    (1e-3, "[128, 64]", "COMPLETE"),  # 1: 1.0
    (1e-1, "[32]", "PRUNED"),         # 2
    (3e-3, "[128, 64]", "COMPLETE"),  # 3: 0.2736
    (3e-2, "[32]", "COMPLETE"),       # 4: 0.7276
    (1e-4, "[128, 64]", "FAIL"),      # 5
    (5e-3, "[32]", "PRUNED"),         # 6
    (2e-2, "[128, 64]", "COMPLETE"),  # 7: 0.0906
]


def loss(lr: float, hidden: str) -> float:
    return (math.log10(lr) + 2) ** 2 + (0.5 if hidden == "[32]" else 0.0)


def cost(lr: float, hidden: str) -> float:  # second objective: the big model costs more
    return 2.0 if hidden == "[128, 64]" else 1.0


def make_study(directions=("minimize",), running_and_waiting: bool = True) -> optuna.Study:
    study = optuna.create_study(study_name="demo", directions=list(directions))
    t0 = dt.datetime(2025, 1, 1, 12, 0, 0)
    for n, (lr, hidden, state) in enumerate(TRIALS):
        values = [loss(lr, hidden), cost(lr, hidden)][: len(directions)] if state == "COMPLETE" else None
        start = t0 + dt.timedelta(minutes=n)
        study.add_trial(FrozenTrial(
            number=n, trial_id=n, state=TrialState[state], value=None, values=values, datetime_start=start,
            datetime_complete=start + dt.timedelta(seconds=10 + n), params={"optim.lr": lr, "model.hidden": hidden},
            distributions=DIST, user_attrs={}, system_attrs={},
            intermediate_values={0: 5.0} if state == "PRUNED" and len(directions) == 1 else {}))
    if running_and_waiting:
        study.ask()  # 8: RUNNING
        study.enqueue_trial({"optim.lr": 1e-2, "model.hidden": "[32]"})  # 9: WAITING
    return study


def cells(table) -> list[list[str]]:
    cols = [list(c.cells) for c in table.columns]
    return [list(row) for row in zip(*cols)]


def render(table) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(table)
    return out.getvalue()


# best_trials_table -------------------------------------------------------------------------------
def test_table_single_objective_top_k_in_direction():
    study = make_study()
    table = report.best_trials_table(study, ["val/loss"], top=3)
    assert [str(c.header) for c in table.columns] == ["trial", "val/loss", "state", "duration", "model.hidden",
                                                       "optim.lr"]
    rows = cells(table)
    assert [r[0] for r in rows] == ["7", "3", "0"]  # the 3 lowest losses, best first; pruned/failed never
    assert rows[0] == ["7", "0.09062", "COMPLETE", "17.0s", "[128, 64]", "0.02"]
    assert table.caption == "10 trials: 5 COMPLETE, 2 PRUNED, 1 FAIL, 1 RUNNING, 1 WAITING"
    assert "best 3 of 5 complete" in table.title and "minimize val/loss" in table.title
    text = render(table)
    assert "[128, 64]" in text and "val/loss" in text and "1 WAITING" in text

    maximize = optuna.create_study(direction="maximize")
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        maximize.add_trial(t)
    # (add_trial renumbers: compare values) the highest first
    assert [r[1] for r in cells(report.best_trials_table(maximize, ["val/acc"], top=2))] == ["1", "0.7276"]
    # top larger than the number of COMPLETE trials: all of them
    assert len(cells(report.best_trials_table(study, ["val/loss"], top=50))) == 5


def test_table_multi_objective_is_the_pareto_front():
    study = make_study(("minimize", "minimize"))
    table = report.best_trials_table(study, ["val/loss", "cost"], top=1)  # top does not cut the front
    headers = [str(c.header) for c in table.columns]
    assert headers[:5] == ["trial", "val/loss", "cost", "state", "duration"]
    # By hand: 7 dominates 1 and 3 ([128, 64], cost 2); 0 dominates 4 (cost 1); 7 vs 0 trade off.
    assert [r[0] for r in cells(table)] == ["7", "0"]
    assert "Pareto front" in table.title and table.caption.startswith("10 trials: 5 COMPLETE")


def test_table_before_any_complete_trial():
    study = optuna.create_study(study_name="empty")
    study.ask()
    table = report.best_trials_table(study, ["val/loss"])
    assert cells(table) == [] and table.caption == "1 trial: 0 COMPLETE, 0 PRUNED, 0 FAIL, 1 RUNNING, 0 WAITING"


# reproduce_command -------------------------------------------------------------------------------
def test_reproduce_command_round_trips_through_shlex():
    fixed = ["trainer.max_epochs=3", "data.batch_size=64"]
    params = ["model.hidden=[128, 64]", "optim.lr=0.003", "model.name=it's", "optim.name=adamw"]
    cmd = report.reproduce_command("experiments/my exps/mlp.yaml", fixed, params)
    assert shlex.split(cmd) == ["litlab", "run", "experiments/my exps/mlp.yaml", *fixed, *params]
    # quoted only where needed
    assert cmd.startswith("litlab run 'experiments/my exps/mlp.yaml' trainer.max_epochs=3 data.batch_size=64 ")
    assert "'model.hidden=[128, 64]'" in cmd and " optim.lr=0.003 " in cmd and cmd.endswith(" optim.name=adamw")
    assert report.reproduce_command("e.yaml", [], []) == "litlab run e.yaml"


def test_the_experiment_is_shown_relative_only_inside_the_working_directory(tmp_path, monkeypatch):
    inside, outside = tmp_path / "work", tmp_path / "elsewhere"
    (inside / "experiments").mkdir(parents=True)
    outside.mkdir()
    monkeypatch.chdir(inside)
    assert report.shown_path(inside / "experiments" / "e.yaml") == "experiments/e.yaml"
    assert report.shown_path("experiments/e.yaml") == "experiments/e.yaml"
    assert report.shown_path(outside / "e.yaml") == str(outside / "e.yaml")  # not ../elsewhere/e.yaml
    assert report.shown_path(tmp_path / "..work.yaml") == str(tmp_path / "..work.yaml")


# study_summary -----------------------------------------------------------------------------------
def test_summary_single_and_multi_objective():
    s = report.study_summary(make_study())
    assert s["n_trials"] == 10 and s["directions"] == ["minimize"]
    assert s["states"] == {"COMPLETE": 5, "PRUNED": 2, "FAIL": 1, "RUNNING": 1, "WAITING": 1}
    assert s["best_trial"] == 7 and s["best_value"] == pytest.approx(loss(2e-2, "[128, 64]"))
    assert s["best_params"] == {"optim.lr": 2e-2, "model.hidden": "[128, 64]"}
    assert [b["number"] for b in s["best_trials"]] == [7]
    json.dumps(s)  # printable as-is by `litlab sweep --show`

    m = report.study_summary(make_study(("minimize", "minimize")))
    assert m["best_value"] is None and m["best_params"] is None and m["directions"] == ["minimize"] * 2
    assert [b["number"] for b in m["best_trials"]] == [7, 0] and m["best_trials"][1]["values"] == [0.5, 1.0]

    empty = report.study_summary(optuna.create_study(study_name="e"))
    assert empty["n_trials"] == 0 and empty["best_value"] is None and empty["best_trials"] == []


# log_study_plots ---------------------------------------------------------------------------------
def parent_run(uri: str) -> tuple[MlflowClient, str]:
    c = tracking.client(uri)
    exp = tracking.get_or_create_experiment(c, uri, "sweep-report")
    return c, c.create_run(exp, run_name="sweep").info.run_id


def artifact_files(c: MlflowClient, run_id: str) -> set[str]:
    return {a.path for a in c.list_artifacts(run_id, "plots")}


def test_plots_single_objective(tracking_uri):
    c, run_id = parent_run(tracking_uri)
    logged = report.log_study_plots(c, run_id, make_study(), ["val/loss"])
    stems = ["optimization_history", "param_importances", "parallel_coordinate"]
    assert logged == [f"plots/{s}.{ext}" for s in stems for ext in ("html", "png")]
    assert artifact_files(c, run_id) == set(logged)
    for stem in stems:
        png = c.download_artifacts(run_id, f"plots/{stem}.png")
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width >= 800 and im.height >= 450  # 10x6 in, not 6.4x4.8
        html = Path(c.download_artifacts(run_id, f"plots/{stem}.html")).read_text()
        assert "cdn.plot.ly" in html and ": val\\u002floss" in html  # titled; plotly.js from the CDN


def test_plots_multi_objective_per_objective_and_pareto(tracking_uri):
    c, run_id = parent_run(tracking_uri)
    logged = report.log_study_plots(c, run_id, make_study(("minimize", "minimize")), ["val/loss", "cost"])
    expected = {f"plots/{stem}_{m}.{ext}" for stem in ("optimization_history", "param_importances",
                                                         "parallel_coordinate")
                for m in ("val_loss", "cost") for ext in ("html", "png")}
    expected |= {"plots/pareto_front.html", "plots/pareto_front.png"}
    assert set(logged) == expected and artifact_files(c, run_id) == expected


def test_plots_that_cannot_be_made_are_skipped_with_a_reason(tracking_uri, caplog):
    c, run_id = parent_run(tracking_uri)
    # One COMPLETE trial over one param: history and parallel coordinates yes, importances no.
    one = optuna.create_study(study_name="one")
    one.add_trial(optuna.trial.create_trial(value=1.0, params={"optim.lr": 0.01},
                                            distributions={"optim.lr": DIST["optim.lr"]}))
    with caplog.at_level("WARNING", logger="litlab.sweep.report"):
        logged = report.log_study_plots(c, run_id, one, ["val/loss"])
    assert "plots/param_importances.png" not in logged and "plots/optimization_history.png" in logged
    assert "plots/parallel_coordinate.html" in logged and logged[-1] == "plots/skipped.txt"
    reasons = c.download_artifacts(run_id, "plots/skipped.txt")
    assert "param_importances: needs >= 2 COMPLETE trials (has 1)" in Path(reasons).read_text()
    assert "param_importances" in caplog.text

    # Two COMPLETE trials but one param: importances would only say "1.0".
    one.add_trial(optuna.trial.create_trial(value=2.0, params={"optim.lr": 0.02},
                                            distributions={"optim.lr": DIST["optim.lr"]}))
    _, run2 = parent_run(tracking_uri)
    assert "plots/param_importances.html" not in report.log_study_plots(c, run2, one, ["val/loss"])
    assert "1 parameter(s) common" in Path(c.download_artifacts(run2, "plots/skipped.txt")).read_text()

    # No COMPLETE trial at all: nothing but the reasons.
    _, run3 = parent_run(tracking_uri)
    assert report.log_study_plots(c, run3, optuna.create_study(),
                                  ["val/loss"]) == ["plots/skipped.txt"]


def test_a_plot_that_raises_is_skipped_not_fatal(tracking_uri, monkeypatch):
    import optuna.visualization.matplotlib as M

    def boom(*a, **k):
        raise RuntimeError("no luck")

    monkeypatch.setattr(M, "plot_parallel_coordinate", boom)
    c, run_id = parent_run(tracking_uri)
    logged = report.log_study_plots(c, run_id, make_study(), ["val/loss"])
    assert "plots/parallel_coordinate.html" in logged and "plots/parallel_coordinate.png" not in logged
    assert "plots/param_importances.png" in logged
    text = Path(c.download_artifacts(run_id, "plots/skipped.txt")).read_text()
    assert "parallel_coordinate.png: RuntimeError: no luck" in text
