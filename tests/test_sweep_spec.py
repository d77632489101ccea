"""The sweep file (litlab.sweep.spec): every sweeps/*.yaml loads, every mistake is one line naming
its key, the space is sampled as declared (conditions, bounds, list choices), values survive the
trip through dotted overrides, and the sampler/pruner names build the right Optuna classes. No training."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from pathlib import Path

import optuna
import pytest
import yaml

from helpers import MLP_DIGITS, REPO
from litlab.config import parse_override
from litlab.errors import ConfigError, UserError
from litlab.runner import load_config
from litlab.sweep import spec as sp
from litlab.sweep.values import canon

optuna.logging.set_verbosity(optuna.logging.WARNING)
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
RESNET_DIGITS = REPO / "experiments" / "cnn" / "resnet_digits.yaml"

BASE = {
    "name": "t",
    "experiment": str(MLP_DIGITS),
    "overrides": ["trainer.max_epochs=2"],
    "metric": "val/acc",
    "direction": "maximize",
    "n_trials": 5,
    "sampler": {"name": "tpe", "seed": 0},
    "pruner": {"name": "median"},
    "space": {
        "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "model.width": {"type": "int", "low": 8, "high": 64, "log": True},
        "model.depth": {"type": "int", "low": 1, "high": 3},
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
        "optim.name": {"type": "categorical", "choices": ["adam", "sgd"]},
        "optim.momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"optim.name": "sgd"}},
        "optim.nesterov": {"type": "categorical", "choices": [False, True], "when": {"optim.name": ["sgd"]}},
        "data.batch_size": {"type": "int", "low": 16, "high": 128, "step": 16},
    },
}


def write(tmp_path: Path, body: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(body, sort_keys=False))
    return p


def load(tmp_path, cli=None, **changes) -> sp.SweepSpec:
    """BASE with top-level `changes`, loaded with the sweep overrides `cli` (as on the command line)."""
    return sp.load_spec(write(tmp_path, {**copy.deepcopy(BASE), **changes}), cli)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_file_loads_and_builds(path):
    s = sp.load_spec(path)
    assert s.space and s.n_trials >= 1 and s.experiment.is_file()
    assert isinstance(sp.build_sampler(s), optuna.samplers.BaseSampler)
    assert isinstance(sp.build_pruner(s), optuna.pruners.BasePruner)
    assert json.loads(json.dumps(s.to_dict()))["space"].keys() == {p.key for p in s.space}
    study = optuna.create_study(directions=s.directions, sampler=sp.build_sampler(s))
    params = sp.suggest(study.ask(), s)
    load_config(s.experiment, s.overrides + sp.objective_overrides(s) + sp.to_overrides(params))


def test_sweep_folder_has_the_three_examples():
    names = {p.name for p in SWEEPS}
    assert {"mlp_digits.yaml", "cnn_digits.yaml", "mlp_digits_multiobjective.yaml"} <= names
    mo = sp.load_spec(REPO / "sweeps" / "mlp_digits_multiobjective.yaml")
    assert mo.multi_objective and mo.sampler["name"] == "nsga2" and mo.pruner["name"] == "none"


def test_defaults_paths_and_to_dict(tmp_path, monkeypatch):
    body = {k: v for k, v in BASE.items() if k in ("metric", "direction", "space")}
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(REPO)  # not beside the sweep file: found from the cwd
    s = sp.load_spec(write(tmp_path / "sub", {**body, "experiment": "experiments/mlp/mlp_digits.yaml"}, "my.sweep.yaml"))
    assert (s.name, s.n_trials, s.timeout, s.storage, s.overrides) == ("my.sweep", 20, None, None, [])
    assert (s.sampler, s.pruner, s.max_retries, s.multi_objective) == ({"name": "tpe"}, {"name": "none"}, 3, False)
    assert s.experiment == MLP_DIGITS and s.directions == ["maximize"]
    d = s.to_dict()
    assert d["metric"] == ["val/acc"] and d["space"]["optim.lr"] == {"type": "float", "low": 1e-4, "high": 1e-1,
                                                                      "log": True, "step": None}
    # beside the sweep file first; direction max/min accepted; overrides as a (nested) mapping
    (tmp_path / "exp.yaml").write_text(MLP_DIGITS.read_text())
    s = load(tmp_path, experiment="exp.yaml", direction="max", overrides={"trainer": {"max_epochs": 3}, "seed": 1})
    assert s.experiment == tmp_path / "exp.yaml" and s.directions == ["maximize"]
    assert s.overrides == ["trainer.max_epochs=3", "seed=1"]
    # sampler / pruner as a name alone, or without a name (tpe, none)
    s = load(tmp_path, sampler="random", pruner={"n_warmup_steps": 1} | {"name": "median"})
    assert (s.sampler, s.pruner) == ({"name": "random"}, {"name": "median", "n_warmup_steps": 1})
    assert load(tmp_path, sampler={"seed": 4}).sampler == {"name": "tpe", "seed": 4}


def test_to_dict_loads_back_as_the_same_sweep(tmp_path):
    s = sp.load_spec(REPO / "sweeps" / "mlp_digits.yaml")
    d = s.to_dict()
    d.pop("path")
    again = sp.load_spec(write(tmp_path, d))
    assert {**again.to_dict(), "path": None} == {**d, "path": None}


def test_sweep_overrides_apply(tmp_path):
    s = load(tmp_path, cli=["n_trials=3", "sampler.seed=1", "pruner.name=none", "timeout=60",
                                  "space.optim.lr.high=0.05", "space.optim.momentum.when.optim.name=[adam, sgd]",
                                  "overrides.trainer.max_epochs=4", "space.model.l2={type: float, low: 0.0, high: 0.01}",
                                  "metric=[val/acc, val/loss]", "direction=[max, min]"])
    assert (s.n_trials, s.sampler["seed"], s.pruner, s.timeout) == (3, 1, {"name": "none"}, 60.0)
    by_key = {p.key: p for p in s.space}
    assert by_key["optim.lr"].high == 0.05 and by_key["optim.momentum"].when == {"optim.name": ["adam", "sgd"]}
    assert s.overrides == ["trainer.max_epochs=4"] and s.space[-1].key == "model.l2"
    assert s.multi_objective and s.directions == ["maximize", "minimize"]
    with pytest.raises(ConfigError, match=r"^n_trals: unknown sweep key \(did you mean 'n_trials'\?\)"):
        load(tmp_path, cli=["n_trals=3"])


def _without_when(key):
    b = copy.deepcopy(BASE)
    b["space"][key].pop("when")
    return b


def _space(**params):
    return {**BASE, "space": {k.replace("__", "."): v for k, v in params.items()}}


ERRORS = [
    ({"metrics": "val/acc"}, "metrics", "did you mean 'metric'"),
    ({"direction": "up"}, "direction", "choose maximize or minimize"),
    ({"metric": ["val/acc", "val/loss"]}, "direction", "1 direction(s) for 2 metric(s)"),
    ({"metric": ["val/acc", "val/acc"], "direction": ["max", "max"]}, "metric", "distinct"),
    ({"n_trials": 0}, "n_trials", "out of range"),
    ({"timeout": -1}, "timeout", "out of range"),
    ({"name": "a b"}, "name", "letters, digits"),
    ({"experiment": "nope.yaml"}, "experiment", "no such file"),
    ({"space": {}}, "space", "non-empty mapping"),
    ({"grace_period": 5}, "grace_period", "greater than heartbeat_interval"),
    ({"sampler": {"name": "bayes"}}, "sampler.name", "choose one of tpe, random, cmaes, gp, qmc, grid, nsga2"),
    ({"pruner": {"name": "medain"}}, "pruner.name", "did you mean 'median'"),
    ({"pruner": {"name": "threshold", "lower": "high"}}, "pruner", "threshold"),
    ({"sampler": {"name": "tpe", "n_startup": 3}}, "sampler.n_startup", "did you mean 'n_startup_trials'"),
    ({"sampler": {"name": "random", "multivariate": True}}, "sampler.multivariate", "allowed: seed"),
    ({"sampler": {"name": "tpe", "seed": -1}}, "sampler.seed", "out of range"),
    ({"sampler": {"name": "qmc", "qmc_type": "lattice"}}, "sampler", "qmc"),
    ({"pruner": {"name": "percentile"}}, "pruner.percentile", "is required for pruner 'percentile'"),
    ({"pruner": {"name": "median", "warmup": 1}}, "pruner.warmup", "allowed: n_startup_trials, n_warmup_steps"),
    ({"metric": ["val/acc", "val/loss"], "direction": ["max", "min"]}, "pruner.name", "cannot prune multi-objective"),
    ({"sampler": {"name": "grid"}}, "space.optim.lr", "grid sampler needs discrete params"),
    ({"overrides": ["trainer.max_epoch=3"]}, "overrides", "did you mean 'max_epochs'"),
    ({"overrides": ["no equals sign"]}, "overrides", "bad override"),
    ({"overrides": ["optim.lr=0.1"]}, "space.optim.lr", "also set in overrides"),
    (_space(optim__lr={"type": "float", "low": 0.1, "high": 0.01}), "space.optim.lr", "low (0.1) must be < high"),
    (_space(optim__lr={"type": "float", "low": 0.0, "high": 0.1, "log": True}), "space.optim.lr.low", "> 0 with log"),
    (_space(optim__lr={"type": "float", "low": 0.1, "high": 1, "log": True, "step": 0.1}), "space.optim.lr.step",
     "cannot be combined with log"),
    (_space(model__dropout={"type": "float", "low": 0, "high": 0.5, "step": 0.3}), "space.model.dropout.step",
     "divide high - low = 0.5"),
    (_space(optim__lr={"type": "float", "high": 0.1}), "space.optim.lr.low", "is required for type float"),
    (_space(optim__lr={"type": "float", "low": 0.01, "high": 0.1, "choices": [1]}), "space.optim.lr.choices",
     "unknown key for type float"),
    (_space(optim__lr={"type": "loguniform", "low": 0.01, "high": 0.1}), "space.optim.lr.type", "float|int|categorical"),
    (_space(model__depth={"type": "int", "low": 1.5, "high": 3}), "space.model.depth.low", "expected an integer"),
    (_space(optim__name={"type": "categorical", "choices": []}), "space.optim.name.choices", "non-empty list"),
    (_space(optim__name={"type": "categorical", "choices": ["adam", "adam"]}), "space.optim.name.choices", "duplicates"),
    (_space(optim__momentum={"type": "float", "low": 0.5, "high": 0.9, "when": {"optim.name": "sgd"}},
            optim__name={"type": "categorical", "choices": ["adam", "sgd"]}),
     "space.optim.momentum.when.optim.name", "must come before this param"),
    (_space(optim__momentum={"type": "float", "low": 0.5, "high": 0.9, "when": {"optim.nme": "sgd"}}),
     "space.optim.momentum.when.optim.nme", "not a param of the space"),
    (_space(optim__name={"type": "categorical", "choices": ["adam", "sgd"]},
            optim__momentum={"type": "float", "low": 0.5, "high": 0.9, "when": {"optim.name": "rmsprop"}}),
     "space.optim.momentum.when.optim.name", "'rmsprop' is not among its choices: adam, sgd"),
    (_space(optim__lr={"type": "float", "low": 1e-3, "high": 20.0, "log": True}), "space.optim.lr",
     "high=20.0 is invalid for mlp_digits.yaml: optim.lr: 20.0 is out of range"),
    (_space(model__hiddn={"type": "int", "low": 1, "high": 3}), "space.model.hiddn", "did you mean 'hidden'"),
    # a misspelt key fails the checks of the keys before it too: told for itself
    (_space(optim__lr={"type": "float", "low": 1e-3, "high": 0.1}, model__dropot={"type": "float", "low": 0, "high": 0.5}),
     "space.model.dropot", "invalid for mlp_digits.yaml: model.dropot: unknown argument for model.name='mlp' "
                           "(did you mean 'dropout'?)"),
    (_space(optim__name={"type": "categorical", "choices": ["adam", "adamx"]}), "space.optim.name",
     "choice adamx is invalid for mlp_digits.yaml: optim.name: 'adamx' is not allowed"),
    (_without_when("optim.nesterov"), "space.optim.nesterov",
     "choice true is invalid for mlp_digits.yaml: optim.nesterov: needs optim.name=sgd"),
    (_space(model__width={"type": "int", "low": 8, "high": 64}), "space.model.width",
     "model.depth: is required when model.width is set"),
]


@pytest.mark.parametrize("changes, key, fragment", ERRORS, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(ERRORS)])
def test_mistakes_are_one_line_naming_the_key(tmp_path, changes, key, fragment):
    body = changes if "space" in changes and "metric" in changes else {**copy.deepcopy(BASE), **changes}
    with pytest.raises(ConfigError) as e:
        sp.load_spec(write(tmp_path, body))
    assert e.value.key == key, str(e.value)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_conditional_space_error_names_the_activating_parent(tmp_path):
    body = _space(optim__name={"type": "categorical", "choices": ["adam", "sgd"]},
                  optim__momentum={"type": "float", "low": 0.5, "high": 1.0, "when": {"optim.name": "sgd"}})
    with pytest.raises(ConfigError, match=r"high=1.0 \(with optim.name=sgd\) is invalid.*optim.momentum: 1.0 is out of range"):
        sp.load_spec(write(tmp_path, body))


@pytest.mark.parametrize("content, fragment", [(None, "no such sweep file"), ("space: [1\n", "malformed YAML (line"),
                                               ("- a\n", "expected a mapping"),
                                               (MLP_DIGITS.read_text(), "s.yaml: this is an experiment file (it has ")])
def test_bad_files_are_user_errors(tmp_path, content, fragment):
    p = tmp_path / "s.yaml"
    if content is not None:
        p.write_text(content)
    with pytest.raises(UserError, match=re.escape(fragment)) as e:
        sp.load_spec(p)
    if "experiment file" in fragment:  # not "description: unknown sweep key": what to do instead
        assert "not a sweep file" in str(e.value) and f"`litlab run {p}`" in str(e.value) and "sweeps/*.yaml" in str(e.value)


def test_suggest_honours_conditions_bounds_and_steps(tmp_path):
    s = load(tmp_path)
    study = optuna.create_study(direction="maximize", sampler=sp.build_sampler(s))
    seen = set()
    for i in range(30):
        trial = study.ask()
        v = sp.suggest(trial, s)
        seen.add(v["optim.name"])
        assert ("optim.momentum" in v) == ("optim.nesterov" in v) == (v["optim.name"] == "sgd")
        assert set(trial.params) == set(v)
        assert 1e-4 <= v["optim.lr"] <= 1e-1 and 8 <= v["model.width"] <= 64 and 1 <= v["model.depth"] <= 3
        assert isinstance(v["model.width"], int) and isinstance(v["optim.nesterov" if "optim.nesterov" in v else "model.depth"], (bool, int))
        # on the grid, exactly as written (0.3, not Optuna's 0.30000000000000004), and Optuna's own value
        assert v["model.dropout"] in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5) and abs(trial.params["model.dropout"] - v["model.dropout"]) < 1e-12
        assert all(len(o) < 40 for o in sp.to_overrides({"model.dropout": v["model.dropout"]}))
        assert v["data.batch_size"] % 16 == 0 and 16 <= v["data.batch_size"] <= 128
        study.tell(trial, float(i % 7))
    assert seen == {"adam", "sgd"}


def test_log_scale_is_sampled_log_uniformly(tmp_path):
    s = load(tmp_path, sampler={"name": "random", "seed": 0})
    study = optuna.create_study(sampler=sp.build_sampler(s))
    lrs = [sp.suggest(study.ask(), s)["optim.lr"] for _ in range(200)]
    assert sum(lr < 1e-2 for lr in lrs) > 120  # 2/3 of a log-uniform [1e-4, 1e-1] lies below 1e-2


def test_list_choices_go_through_optuna_as_json_and_decode(tmp_path):
    body = {**BASE, "experiment": str(RESNET_DIGITS), "sampler": {"name": "random", "seed": 1},
            "space": {"model.widths": {"type": "categorical", "choices": [[8, 16, 32], [16, 32, 64]]},
                      "model.blocks": {"type": "categorical", "choices": [[1, 1, 1], [2, 2, 2]]},
                      "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "when": {"model.widths": [[8, 16, 32]]}}}}
    s = sp.load_spec(write(tmp_path, body))
    study = optuna.create_study(sampler=sp.build_sampler(s))
    got = []
    for _ in range(20):
        trial = study.ask()
        v = sp.suggest(trial, s)
        assert v["model.widths"] in ([8, 16, 32], [16, 32, 64]) and trial.params["model.widths"] == json.dumps(v["model.widths"])
        assert ("optim.lr" in v) == (v["model.widths"] == [8, 16, 32])
        got.append(v["model.widths"])
        assert parse_override(sp.to_overrides({"model.widths": v["model.widths"]})[0]) == ("model.widths", v["model.widths"])
    assert [8, 16, 32] in got and [16, 32, 64] in got


@pytest.mark.parametrize("value", [0.0123, 1e-05, 3.0e-3, 1.0, -2.5, 1e300, 5e-324, 7, 0, True, False, None, "sgd", "val/acc",
                                   "true", "1e-3", "null", "a: b", "x # y", "", " pad", "[1]", "it's", [128, 64], [],
                                   [1.5e-05, "a,b", None], {"a": 1, "b": [True]}, [[1, 2], [3]], math.inf, -math.inf])
def test_to_overrides_round_trips_through_parse_override(value):
    [text] = sp.to_overrides({"model.x": value})
    key, back = parse_override(text)
    assert key == "model.x" and canon(back) == canon(value) and type(back) is type(value), text
    assert "\n" not in text


def test_to_overrides_writes_values_plainly():
    assert sp.to_overrides({"optim.lr": 0.0123, "model.hidden": [128, 64], "optim.name": "sgd", "x": True}) == [
        "optim.lr=0.0123", "model.hidden=[128, 64]", "optim.name=sgd", "x=true"]


@pytest.mark.parametrize("name, cls", [("tpe", "TPESampler"), ("random", "RandomSampler"), ("gp", "GPSampler"),
                                       ("qmc", "QMCSampler"), ("nsga2", "NSGAIISampler"), ("cmaes", "CmaEsSampler")])
def test_build_sampler_for_every_name(tmp_path, name, cls):
    try:
        s = load(tmp_path, sampler={"name": name, "seed": 3})
    except ConfigError as e:  # cmaes needs the optional `cmaes` package
        assert name == "cmaes" and "needs the 'cmaes' package" in str(e)
        return
    sampler = sp.build_sampler(s)
    assert type(sampler).__name__ == cls
    if name == "tpe":  # conditional spaces need group (see build_sampler)
        assert sampler._multivariate is True and sampler._group is True


def test_seed_offset_changes_the_random_draws(tmp_path):
    s = load(tmp_path, sampler={"name": "random", "seed": 0})
    first = [sp.suggest(optuna.create_study(sampler=sp.build_sampler(s, seed_offset=k)).ask(), s)["optim.lr"]
             for k in (0, 0, 1)]
    assert first[0] == first[1] != first[2]


@pytest.mark.parametrize("name, kwargs, cls", [("none", {}, "NopPruner"), ("median", {"n_warmup_steps": 2}, "MedianPruner"),
                                               ("percentile", {"percentile": 25.0}, "PercentilePruner"),
                                               ("successive_halving", {"min_resource": 1}, "SuccessiveHalvingPruner"),
                                               ("hyperband", {"max_resource": 10}, "HyperbandPruner"),
                                               ("threshold", {"lower": 0.3}, "ThresholdPruner")])
def test_build_pruner_for_every_name(tmp_path, name, kwargs, cls):
    s = load(tmp_path, pruner={"name": name, **kwargs})
    assert type(sp.build_pruner(s)).__name__ == cls


def test_grid_covers_the_grid_exactly(tmp_path):
    space = {"model.dropout": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1},
             "model.depth": {"type": "int", "low": 1, "high": 2},
             "model.width": {"type": "int", "low": 16, "high": 48, "step": 16},
             "model.hidden": {"type": "categorical", "choices": [[8], [16, 8]]}}
    s = load(tmp_path, sampler={"name": "grid", "seed": 0}, space=space)
    assert sp.grid_space(s)["model.dropout"] == [0.0, 0.1, 0.2, 0.3]
    study = optuna.create_study(sampler=sp.build_sampler(s))
    seen = []

    def objective(trial):  # optimize, not ask/tell: the grid sampler calls study.stop() when exhausted
        v = sp.suggest(trial, s)
        seen.append((v["model.dropout"], v["model.depth"], v["model.width"], json.dumps(v["model.hidden"])))
        return 0.0

    study.optimize(objective, n_trials=100)
    expected = set(itertools.product([0.0, 0.1, 0.2, 0.3], [1, 2], [16, 32, 48], ["[8]", "[16, 8]"]))
    assert len(seen) == len(expected) and set(seen) == expected


def test_objective_overrides_follow_the_first_metric(tmp_path):
    s = load(tmp_path, metric="val/loss", direction="minimize")
    assert sp.objective_overrides(s) == ["callbacks.checkpoint.monitor=val/loss", "callbacks.checkpoint.mode=min"]
    s = load(tmp_path, metric="test/acc")
    assert sp.objective_overrides(s) == []
    s = load(tmp_path, cli=["overrides.callbacks.checkpoint.mode=max"])
    assert sp.objective_overrides(s) == ["callbacks.checkpoint.monitor=val/acc"]
    s = load(tmp_path, cli=["overrides.callbacks.checkpoint.monitor=val/loss"])
    assert sp.objective_overrides(s) == []


def test_mlp_width_and_depth_make_a_uniform_mlp():
    from litlab.chapters.mlp.module import MLPClassifier

    m = MLPClassifier(input_shape=[1, 8, 8], num_classes=10, hidden=[5], width=12, depth=3)
    assert [tuple(w.shape) for w in m.net.weight_matrices()] == [(12, 64), (12, 12), (12, 12), (10, 12)]
    assert load_config(MLP_DIGITS, ["model.width=12", "model.depth=3"]).model["width"] == 12
    for given, missing in (({"width": 8}, "model.depth"), ({"depth": 2}, "model.width")):
        with pytest.raises(ConfigError) as e:
            MLPClassifier(input_shape=[4], num_classes=3, **given)
        assert e.value.key == missing


def test_a_typo_in_the_space_is_told_before_lightning_is_imported(tmp_path):
    """`litlab sweep` checks the space as `litlab run` checks an experiment before importing
    Lightning (names, arguments, values: 1 s instead of 9 s), then with the classes."""
    from helpers import run_cli_heavy_imports

    path = write(tmp_path, _space(optim__lr={"type": "float", "low": 1e-3, "high": 0.1},
                                  model__dropout={"type": "float", "low": 0.0, "high": 1.5}))
    status, imported, stderr = run_cli_heavy_imports("sweep", str(path), cwd=tmp_path)
    assert (status, imported) == (2, []), stderr
    assert stderr.strip() == ("litlab sweep: error: space.model.dropout: high=1.5 is invalid for mlp_digits.yaml: "
                                   "model.dropout: 1.5 is out of range: must be >= 0 and < 1"), stderr


def test_litlab_sweep_checks_with_the_classes_too(tmp_path, capsys):
    """What only a model's constructor knows (MLP width without depth) still stops `litlab sweep`
    before any trial: the second pass of the checks, after the import of Lightning."""
    from litlab.cli import main

    path = write(tmp_path, _space(model__width={"type": "int", "low": 8, "high": 64}))
    assert main(["sweep", str(path), "--storage", f"sqlite:///{tmp_path}/optuna.db",
                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("litlab sweep: error: space.model.width: low=8 is invalid for mlp_digits.yaml: "
                           "model.depth: is required when model.width is set"), line
    assert not (tmp_path / "optuna.db").exists()  # no study was made
