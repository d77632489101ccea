"""The `litlab` command: fast --help everywhere, models, runs, real exit codes."""

from __future__ import annotations

import time

import pytest

from helpers import MLP_DIGITS, QUICK, run_cli, run_cli_tail
from litlab import runner
from litlab.cli import main


@pytest.mark.parametrize("command", [[], ["run"], ["resume"], ["models"], ["runs"], ["ui"]])
def test_help_is_fast_and_lists_usage(command, tmp_path):
    start = time.perf_counter()
    proc = run_cli(*command, "--help", cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and "usage: litlab" in proc.stdout
    assert elapsed < 3.0, f"--help took {elapsed:.2f} s: a heavy import crept into the CLI"


def test_user_error_in_a_real_process_is_one_line_exit_2(tmp_path):
    proc = run_cli("run", str(MLP_DIGITS), "optim.lr=banana", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["litlab run: error: optim.lr: expected a number, got 'banana'"], proc.stderr


@pytest.mark.parametrize("args,error", [
    (["trainer.max_epoch=3"], "trainer.max_epoch: unknown key (did you mean 'max_epochs'?)"),
    (["optim.nesterov=true", "optim.name=adam"], "optim.nesterov: needs optim.name=sgd and optim.momentum > 0"),
    (["bogus=1"], "bogus: unknown section"),
    (["model.hiden=[8]"], "model.hiden: unknown argument for model.name='mlp' (did you mean 'hidden'?)"),
    (["model.name=mlpp"], "model.name: unknown name 'mlpp' (did you mean 'mlp'?)"),
    (["data.batchsize=8", "model.hiden=[8]"], "data.batchsize: unknown argument for data.name='digits' (did you "
                                              "mean 'batch_size'?)"),
    (["data.name=digit"], "data.name: unknown name 'digit' (did you mean 'digits'?)"),
    (["model.activation=rellu"], "model.activation: 'rellu' is not allowed: choose one of sigmoid, tanh, relu,"),
    (["model.hidden=[8,0]"], "model.hidden[1]: 0 is out of range: must be >= 1"),
    (["model.dropout=1"], "model.dropout: 1.0 is out of range: must be >= 0 and < 1"),
    (["model.width=wide"], "model.width: expected int (>= 1 and <= 65536) or null, got 'wide'"),
    (["model.dropout=2", "data.batch_size=0"], "data.batch_size: 0 is out of range: must be >= 1"),
])
def test_a_mistake_in_litlabs_own_sections_is_told_before_lightning_is_imported(tmp_path, args, error):
    """A typo in optim/trainer/callbacks/tracking, or in a model's or data's name, argument name or
    value, took 9 s to report (the import of Lightning came first); now 0.2 to 0.5 s (the names and
    the arguments' types are read from the source: tests/test_registry.py checks them against the
    classes). The message is the one config.validate gives with the classes."""
    from helpers import run_cli_heavy_imports

    status, imported, stderr = run_cli_heavy_imports("run", str(MLP_DIGITS), *args, cwd=tmp_path)
    assert (status, imported) == (2, []), stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"litlab run: error: {error}"), line
    if args[0].startswith(("model.", "data.")):  # word for word what validate() says with the classes
        from litlab import runner
        from litlab.errors import ConfigError

        with pytest.raises(ConfigError) as told:
            runner.load_config(MLP_DIGITS, args)  # with what the data tells the model (input_shape)
        # a name's list of choices here also holds what other tests registered in this process
        early, _, choices = line.partition("; choose one of: ")
        full, _, all_choices = f"litlab run: error: {told.value}".partition("; choose one of: ")
        assert early == full and set(choices.split(", ")) <= set(all_choices.split(", "))


def test_resuming_a_run_that_is_not_there_is_told_before_lightning_is_imported(tmp_path):
    """`litlab resume` of a mistyped run id: one line after the tracking store's answer (~2 s of
    importing MLflow), not after the ~9 s import of Lightning."""
    from helpers import run_cli_heavy_imports

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    status, imported, stderr = run_cli_heavy_imports("resume", "--tracking-uri", uri, "0123456789abcdef", cwd=tmp_path)
    assert (status, imported) == (2, []), stderr
    assert stderr.strip() == (f"litlab resume: error: no run '0123456789abcdef' in the tracking store {uri} "
                                   "(list them with `litlab runs`)"), stderr


def test_a_missing_dependency_is_one_line_naming_the_package(tmp_path):
    """mlflow not installed (as on a bare GPU image): `litlab run` says which package and how to
    do without it, exit 2, no traceback; an import error of anything else is not hidden."""
    import subprocess
    import sys

    from helpers import cli_env
    from litlab.cli import _missing_dependency

    without_mlflow = "import sys; sys.modules['mlflow'] = None; from litlab.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", without_mlflow, "run", str(MLP_DIGITS), *QUICK], cwd=tmp_path,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "litlab run: error: this needs the Python package 'mlflow', which is not installed: "
        "pip install mlflow (or run untracked: tracking.mlflow=false)"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert _missing_dependency(ModuleNotFoundError(name="torch_geometric.data")) == "torch-geometric"
    assert _missing_dependency(ModuleNotFoundError(name="litlab.no_such_module")) is None


def test_models_lists_every_model_with_chapter(capsys):
    from litlab import registry

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    registry.load_all()
    for name, entry in registry.MODELS.items():
        assert name in out and entry.description in out
    assert "1-2 MLPs and optimisation" in out


def test_runs_table_newest_first(tracking_uri, capsys):
    a = runner.run(MLP_DIGITS, QUICK + ["trainer.max_epochs=1", "tracking.system_metrics=false"], tracking_uri=tracking_uri)
    b = runner.run(MLP_DIGITS, QUICK + ["trainer.max_epochs=1", "tracking.system_metrics=false"], tracking_uri=tracking_uri)
    capsys.readouterr()
    assert main(["runs", "--tracking-uri", tracking_uri, "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert out.index(b.run_id) < out.index(a.run_id)
    assert "FINISHED" in out and "mlp" in out and "test/acc=" in out
    assert main(["runs", "--tracking-uri", tracking_uri, "--experiment", "mlp_digits", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert b.run_id in out and a.run_id not in out


def test_looking_at_runs_imports_neither_torch_nor_lightning(tracking_uri, tmp_path):
    """`litlab runs`, `compare`, `sync` and `ui` only read the store: importing Lightning made
    `litlab runs` take 12 s here instead of 3."""
    import subprocess
    import sys

    from helpers import cli_env
    from litlab import tracking_store

    run_ids = []
    for lr in (0.1, 0.2):
        run_ids.append(tracking_store.start_run(tracking_uri, "looked_at", f"lr{lr}", {"optim.lr": lr}, {}, "{}\n"))
        tracking_store.end_run(tracking_uri, run_ids[-1], "FINISHED")
    code = ("import sys\nfrom litlab.cli import main\n"
            f"main(['runs', '--tracking-uri', {tracking_uri!r}])\n"
            f"main(['compare', '--experiment', 'looked_at', '--tracking-uri', {tracking_uri!r}])\n"
            f"main(['sync', '--tracking-uri', {tracking_uri!r}])\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'datasets'}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(proc.stdout.count(run_id[:8]) == 2 for run_id in run_ids)  # a row of `runs`, a column of `compare`
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-500:]


@pytest.mark.slow
def test_run_prints_id_metrics_and_how_to_look(tracking_uri, tmp_path):
    proc = run_cli("run", str(MLP_DIGITS), "--tracking-uri", tracking_uri, *QUICK, "trainer.max_epochs=1",
                   "tracking.system_metrics=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test/acc" in proc.stdout and "litlab ui" in proc.stdout and "litlab resume" in proc.stdout
    assert "FINISHED" in proc.stdout


@pytest.mark.slow
def test_the_command_ends_right_after_its_last_line(tracking_uri, tmp_path):
    # The interpreter's final garbage-cycle search over torch, Lightning and MLflow took 4 s here
    # after the run had printed everything (litlab.cli.run_as_program freezes them instead).
    code, out, tail = run_cli_tail("run", str(MLP_DIGITS), "--tracking-uri", tracking_uri, *QUICK,
                                   "trainer.max_epochs=1", "tracking.system_metrics=false", cwd=tmp_path)
    assert code == 0, out[-2000:]
    assert tail < 2.5, f"{tail:.1f} s from the last line to the end"


def test_dry_run_prints_resolved_config(capsys):
    assert main(["run", str(MLP_DIGITS), "--dry-run", "optim.lr=0.02"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.02" in out and "num_classes: 10" in out


@pytest.mark.slow
def test_ui_serves_the_same_store(tracking_uri, tmp_path):
    """`litlab ui` starts the MLflow UI on 127.0.0.1 over litlab's store; the run is visible there."""
    import json
    import signal
    import socket
    import subprocess
    import urllib.request

    from helpers import cli_env, litlab_cmd

    result = runner.run(MLP_DIGITS, QUICK + ["trainer.max_epochs=1", "tracking.system_metrics=false"],
                        tracking_uri=tracking_uri)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(litlab_cmd("ui", "--port", str(port), "--tracking-uri", tracking_uri), cwd=tmp_path,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        body = None
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/get?run_id={result.run_id}")
                body = json.load(urllib.request.urlopen(req, timeout=5))
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "UI never answered"
        assert body["run"]["info"]["run_id"] == result.run_id
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
        assert "<html" in page.lower()
        # mlflow's CLI and its one uvicorn worker; not MLflow's job runner and its 8 processes (1.2 GiB)
        members = subprocess.run(["ps", "-o", "args=", "-s", str(proc.pid)], capture_output=True, text=True).stdout
        assert len(members.splitlines()) == 2 and "job_runner" not in members, members
    finally:
        import os

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.parametrize("command, required", [("run", "EXPERIMENT.yaml"), ("resume", "RUN_ID"),
                                               ("sweep", "SWEEP.yaml")])
def test_a_missing_argument_names_only_what_is_required(command, required, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"litlab {command}: error: the following arguments are "
                                                        f"required: {required}")  # not key=value: optional


def test_a_resumed_runs_own_checkpoint_directory_is_not_warned_about():
    import warnings

    from litlab import cli

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli._quiet_libraries()
        warnings.warn("Checkpoint directory /x/mlruns/checkpoints/abc exists and is not empty.", UserWarning)
        warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in seen] == ["something else"]
