"""Config loading, overrides and validation: every user mistake is one clear line, exit 2."""

from __future__ import annotations

import pytest

from helpers import MLP_DIGITS, all_runs
from litlab import config
from litlab.cli import main
from litlab.errors import ConfigError, UserError
from litlab.runner import load_config


def test_overrides_parse_yaml_values():
    assert config.parse_override("optim.lr=1e-3") == ("optim.lr", 1e-3)
    assert config.parse_override("model.hidden=[256,128]") == ("model.hidden", [256, 128])
    assert config.parse_override("trainer.deterministic=true") == ("trainer.deterministic", True)
    assert config.parse_override("trainer.gradient_clip_val=null") == ("trainer.gradient_clip_val", None)


def test_yaml_reads_exponent_floats(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("optim: {lr: 1e-3, eps: 1.0e-8}\n")
    assert config.load_yaml(p)["optim"] == {"lr": 1e-3, "eps": 1e-8}


def test_resolved_config_has_every_default_and_overrides_apply():
    cfg = load_config(MLP_DIGITS, ["model.hidden=[256,128]", "optim.lr=0.01", "optim.name=sgd",
                                   "optim.momentum=0.9", "optim.nesterov=true"])
    d = cfg.to_dict()
    assert d["model"]["hidden"] == [256, 128]
    assert d["optim"]["lr"] == 0.01 and d["optim"]["nesterov"] is True
    assert d["model"]["num_classes"] == 10  # filled from the data
    flat = config.flatten(d)
    assert "trainer.max_epochs" in flat and "optim.scheduler.name" in flat and "data.batch_size" in flat


def test_identity_hash_ignores_training_length_only():
    a = load_config(MLP_DIGITS)
    assert a.identity_hash() == load_config(MLP_DIGITS, ["trainer.max_epochs=99"]).identity_hash()
    assert a.identity_hash() != load_config(MLP_DIGITS, ["optim.lr=0.5"]).identity_hash()


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["foo.bar=1"], "foo.bar", "unknown section"),
        (["model.hiddn=[3]"], "model.hiddn", "did you mean 'hidden'"),
        (["model.name=nope"], "model.name", "unknown name 'nope'"),
        (["data.name=nope"], "data.name", "choose one of"),
        (["optim.name=adamx"], "optim.name", "choose one of sgd, rmsprop, adam, adamw"),
        (["optim.lr=abc"], "optim.lr", "expected a number"),
        (["optim.lr=-1"], "optim.lr", "out of range"),
        (["trainer.max_epochs=0"], "trainer.max_epochs", "out of range"),
        (["trainer.max_epochs=1e12"], "trainer.max_epochs", "out of range"),
        (["trainer.precision=8"], "trainer.precision", "not allowed"),
        (["trainer.strategy=horovod"], "trainer.strategy", "not allowed"),
        (["trainer.devices=-2"], "trainer.devices", "out of range"),
        (["trainer.deterministic=maybe"], "trainer.deterministic", "expected true or false"),
        (["model.dropout=1.5"], "model.dropout", "out of range"),
        (["model.activation=swish"], "model.activation", "not allowed"),
        (["optim.nesterov=true"], "optim.nesterov", "momentum > 0"),
        (["callbacks.checkpoint.mode=up"], "callbacks.checkpoint.mode", "not allowed"),
        (["tracking.wandb=yes"], "tracking.wandb", "not allowed"),
        (["data.batch_size=0"], "data.batch_size", "out of range"),
    ],
)
def test_bad_values_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(MLP_DIGITS, overrides)
    assert e.value.key == key
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("model: [1, 2\n", "malformed YAML (line"),
        ("- just\n- a list\n", "expected a mapping"),
        ("name: x\ndata: {name: digits}\n", "model: missing"),
        ("name: x\nmodel: {hidden: [3]}\ndata: {name: digits}\n", "model.name: is required"),
        ("name: 'bad name!'\nmodel: {name: mlp}\ndata: {name: digits}\n", "name: 'bad name!'"),
        ("name: x\nmodel: {name: mlp}\ndata: {name: digits}\noptim: 3\n", "optim: expected a section"),
    ],
)
def test_bad_files(tmp_path, content, fragment):
    p = tmp_path / "bad.yaml"
    p.write_text(content)
    with pytest.raises(UserError) as e:
        load_config(p)
    assert fragment in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(UserError, match="bad override"):
        load_config(MLP_DIGITS, ["optim.lr"])
    with pytest.raises(UserError, match="bad override"):
        load_config(MLP_DIGITS, ["=3"])


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["run", "does/not/exist.yaml"], "no such experiment file"),
        (["run", str(MLP_DIGITS), "optim.lr=-3"], "optim.lr: -3.0 is out of range"),
        (["run", str(MLP_DIGITS), "model.name=resnet999"], "model.name: unknown name"),
        (["run", str(MLP_DIGITS), "trainer.accelerator=gpu"], "trainer:"),  # no GPU here; skipped below if one
        (["run", str(MLP_DIGITS), "optim.scheduler.name=step", "optim.scheduler.step_size=500"],
         "optim.scheduler.step_size: 500 >= trainer.max_epochs"),  # found inside fit, still no run left
        (["resume", "0123456789abcdef"], "no run '0123456789abcdef'"),
        (["runs", "--experiment", "nope"], "no experiment 'nope'"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(argv, fragment, tracking_uri, capsys):
    import torch

    if "trainer.accelerator=gpu" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code = main([*argv[:1], "--tracking-uri", tracking_uri, *argv[1:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and fragment in err[0], err
    assert "Traceback" not in err[0]
    assert not [r for r in all_runs(tracking_uri) if r.info.status == "RUNNING"]
    assert not all_runs(tracking_uri)  # nothing half-made is left behind
