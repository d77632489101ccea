"""Property-based: whatever malformed input a user gives `litlab run` or `litlab sweep` (broken
YAML, wrong types, unknown keys, negative or absurd values, unknown names), the answer is exit
status 2 and ONE line on stderr: no traceback, no training, no run or trial left RUNNING."""

from __future__ import annotations

import copy
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import MLP_DIGITS, all_runs
from litlab import cli

BASE = yaml.safe_load(MLP_DIGITS.read_text())
SAFETY_NET = ["trainer.fast_dev_run=true", "tracking.system_metrics=false"]  # if a bad input slipped through

ident = st.text(string.ascii_lowercase + "_", min_size=3, max_size=12).filter(lambda s: s[0] != "_")
junk_text = st.text(min_size=1, max_size=12).filter(lambda s: "\x00" not in s)
wrong_type = st.one_of(st.lists(st.integers(), min_size=2, max_size=3), st.dictionaries(ident, st.integers(), min_size=1,
                                                                                         max_size=2))
not_a_number = st.one_of(ident, wrong_type)


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


# (dotted key, strategy of bad values): negative, zero, absurd, wrong type
BAD_VALUES = {
    "trainer.max_epochs": st.one_of(st.integers(max_value=0), st.integers(min_value=10**7), not_a_number),
    "data.batch_size": st.one_of(st.integers(max_value=0), st.integers(min_value=10**7), not_a_number),
    "optim.lr": st.one_of(st.floats(max_value=0), st.floats(min_value=1e3, allow_infinity=True), st.just(float("nan")),
                          not_a_number),
    "model.dropout": st.one_of(st.floats(max_value=-1e-3), st.floats(min_value=1.0), not_a_number),
    "model.hidden": st.one_of(st.lists(st.integers(max_value=0), min_size=1, max_size=3), ident),
    "data.val_fraction": st.one_of(st.floats(max_value=0), st.floats(min_value=0.95), not_a_number),
    "seed": st.one_of(st.integers(max_value=-1), ident),
    "trainer.precision": st.one_of(ident, st.integers()),
    "callbacks.checkpoint.mode": ident,
    "model.name": ident, "data.name": ident, "optim.name": ident, "optim.scheduler.name": ident,
}
SECTIONS = ["", "model.", "data.", "optim.", "trainer.", "callbacks.checkpoint.", "tracking."]


@st.composite
def bad_run_input(draw):
    """(yaml text, overrides): one corruption of the valid mlp_digits config."""
    kind = draw(st.sampled_from(["unknown_key", "bad_value", "bad_value_override", "broken_yaml", "not_a_mapping",
                                 "bad_override_syntax"]))
    cfg = copy.deepcopy(BASE)
    overrides: list[str] = []
    if kind == "unknown_key":
        key = draw(st.sampled_from(SECTIONS)) + draw(ident)
        value = draw(st.one_of(st.integers(), ident))
        if draw(st.booleans()):
            _set(cfg, key, value)
        else:
            overrides.append(f"{key}={value}")
    elif kind in ("bad_value", "bad_value_override"):
        key = draw(st.sampled_from(sorted(BAD_VALUES)))
        value = draw(BAD_VALUES[key])
        if kind == "bad_value":
            _set(cfg, key, value)
        else:
            overrides.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    elif kind == "broken_yaml":
        return draw(st.sampled_from(["model: [1, 2", "a: b: c", "\tmodel: x", "model: {name: mlp", "- [", "{{"])) + \
            draw(junk_text), overrides
    elif kind == "not_a_mapping":
        return yaml.safe_dump(draw(st.one_of(st.lists(st.integers()), st.integers(), junk_text))), overrides
    else:
        overrides.append(draw(st.sampled_from(["=1", "model.=3", "novalue", "a..b=1", ".x=1"])))
    return yaml.safe_dump(cfg), overrides


def _assert_one_line_exit_2(code, err: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("litlab "), err[-2000:]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    return root, f"sqlite:///{root}/mlflow.db"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=bad_run_input())
def test_litlab_run_rejects_bad_input_in_one_line(bad, store, capsys, monkeypatch):
    root, uri = store
    monkeypatch.chdir(root)
    text, overrides = bad
    path = root / "experiment.yaml"
    path.write_text(text)
    capsys.readouterr()
    code = cli.main(["run", str(path), "--tracking-uri", uri, *overrides, *SAFETY_NET])
    _assert_one_line_exit_2(code, capsys.readouterr().err)
    assert not [r for r in all_runs(uri, include_deleted=False) if r.info.status == "RUNNING"]


SWEEP = {
    "name": "bad", "experiment": str(MLP_DIGITS), "overrides": ["model.hidden=[8]", *SAFETY_NET],
    "metric": "val/acc", "direction": "maximize", "n_trials": 2,
    "sampler": {"name": "tpe", "seed": 0}, "pruner": {"name": "median"},
    "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
}
BAD_SWEEP_VALUES = {
    "n_trials": st.one_of(st.integers(max_value=0), not_a_number),
    "direction": ident, "metric": wrong_type, "sampler.name": ident, "pruner.name": ident,
    "experiment": ident, "timeout": st.one_of(st.integers(max_value=-1), not_a_number),
    "space.optim.lr.type": ident, "space.optim.lr.low": st.just(1.0), "space.optim.lr.high": not_a_number,
    "space.optim.lr": st.one_of(ident, st.integers()), "space.model.no_such_arg": st.just({"type": "int", "low": 1, "high": 3}),
    "space.optim.lr.log": ident,
}


@st.composite
def bad_sweep_input(draw):
    kind = draw(st.sampled_from(["unknown_key", "bad_value", "broken_yaml", "bad_override"]))
    spec = copy.deepcopy(SWEEP)
    overrides: list[str] = []
    if kind == "unknown_key":
        spec[draw(ident.filter(lambda k: k not in SWEEP and k not in ("storage", "timeout", "heartbeat_interval")))] = 1
    elif kind == "bad_value":
        key = draw(st.sampled_from(sorted(BAD_SWEEP_VALUES)))
        if key.startswith("space."):
            spec["space"][key[len("space."):].rsplit(".", 1)[0] if key.count(".") > 2 else key[len("space."):]] = \
                spec["space"].get("optim.lr") if key.count(".") > 2 else None
            if key.count(".") > 2:
                param, field = key[len("space."):].rsplit(".", 1)
                spec["space"][param] = {**SWEEP["space"]["optim.lr"], field: draw(BAD_SWEEP_VALUES[key])}
            else:
                spec["space"][key[len("space."):]] = draw(BAD_SWEEP_VALUES[key])
        else:
            _set(spec, key, draw(BAD_SWEEP_VALUES[key]))
    elif kind == "broken_yaml":
        return draw(st.sampled_from(["space: [", "name: a: b", "\tn_trials: 1", "{{"])) + draw(junk_text), overrides
    else:
        overrides.append(draw(st.sampled_from(["n_trials=-1", "sampler.name=nope", "bogus_key=3", "=1"])))
    return yaml.safe_dump(spec), overrides


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=bad_sweep_input())
def test_litlab_sweep_rejects_bad_input_in_one_line(bad, store, capsys, monkeypatch):
    root, uri = store
    monkeypatch.chdir(root)
    text, overrides = bad
    path = root / "sweep.yaml"
    path.write_text(text)
    capsys.readouterr()
    code = cli.main(["sweep", str(path), "--tracking-uri", uri, "--storage", f"sqlite:///{root}/optuna.db",
                     *overrides])
    _assert_one_line_exit_2(code, capsys.readouterr().err)
    assert not [r for r in all_runs(uri, include_deleted=False) if r.info.status == "RUNNING"]
