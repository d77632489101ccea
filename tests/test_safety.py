"""Safety: secrets never reach what a run publishes; only registered classes unless --allow-import;
checkpoints load as plain tensors and from outside mlruns/ only when allowed; `litlab ui` binds
loopback and warns otherwise; a full or unwritable disk is one line before any run exists."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from helpers import MLP_DIGITS, QUICK, all_runs, run_cli
from litlab import cli, registry, runner
from litlab.checkpointing import load_checkpoint
from litlab.errors import UserError

SECRET = "sk-planted-0123456789abcdef"
WANDB_SECRET = "0123456789abcdef0123456789abcdef01234567"


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_secrets_never_reach_params_tags_or_artifacts(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    monkeypatch.setenv("DATABASE_URL_NOT_A_SECRET_NAME", "harmless")
    # a user who pasted a secret into the config itself: masked too
    result = runner.run(MLP_DIGITS, [*QUICK, "trainer.max_epochs=1", f"tracking.run_name=leak-{SECRET}",
                                     "tracking.wandb=offline"], tracking_uri=tracking_uri)
    run = MlflowClient(tracking_uri=tracking_uri).get_run(result.run_id)
    published = " ".join([*map(str, run.data.params.items()), *map(str, run.data.tags.items())])
    assert SECRET not in published and WANDB_SECRET not in published
    assert "leak-***" in run.data.tags["mlflow.runName"]
    artifacts = Path(MlflowClient(tracking_uri=tracking_uri).download_artifacts(result.run_id, "", str(tmp_path / "a")))
    blob = _all_bytes(artifacts) + _all_bytes(Path("mlruns/wandb")) + _all_bytes(Path(result.last_checkpoint).parent)
    assert blob and SECRET.encode() not in blob and WANDB_SECRET.encode() not in blob
    assert (artifacts / "checkpoints" / "last.ckpt").exists()  # the search did cover the checkpoints


def test_configs_name_only_registered_classes_unless_allow_import(monkeypatch, tmp_path):
    path = "litlab.chapters.mlp.module:MLPClassifier"
    monkeypatch.delenv("LITLAB_ALLOW_IMPORT", raising=False)
    with pytest.raises(UserError, match="--allow-import"):
        registry.get_model(path)
    p = run_cli("run", str(MLP_DIGITS), "--dry-run", "model.name=os:system", cwd=tmp_path)
    assert p.returncode == 2 and "--allow-import" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    monkeypatch.setenv("LITLAB_ALLOW_IMPORT", "1")
    assert registry.get_model(path).name == "mlp"  # the class is the registered one
    with pytest.raises(UserError, match="cannot import"):
        registry.get_model("no_such_package_xyz:Model")


def test_checkpoints_load_as_plain_tensors_and_external_ones_need_a_flag(tmp_path, monkeypatch):
    monkeypatch.delenv("LITLAB_ALLOW_EXTERNAL_CHECKPOINTS", raising=False)
    outside = tmp_path / "shared" / "model.ckpt"
    outside.parent.mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}}, outside)
    with pytest.raises(UserError, match="--allow-external-checkpoints"):
        load_checkpoint(outside)
    inside = tmp_path / "mlruns" / "checkpoints" / "x" / "last.ckpt"
    inside.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(2)}}, inside)
    assert torch.equal(load_checkpoint(inside)["state_dict"]["w"], torch.ones(2))
    monkeypatch.setenv("LITLAB_ALLOW_EXTERNAL_CHECKPOINTS", "1")
    assert torch.equal(load_checkpoint(outside)["state_dict"]["w"], torch.ones(2))

    class Payload:  # unpickling it would run code: weights_only refuses
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "mlruns" / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(evil)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_binds_loopback_and_warns_for_other_hosts(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda exe, cmd: calls.append(cmd))
    port = str(_free_port())
    cli.main(["ui", "--port", port])
    assert calls[-1][calls[-1].index("--host") + 1] == "127.0.0.1"
    assert calls[-1][calls[-1].index("--port") + 1] == port
    assert "warning" not in capsys.readouterr().err
    cli.main(["ui", "--host", "0.0.0.0", "--port", port])
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err


def test_ui_refuses_an_address_it_cannot_listen_on_in_one_line(monkeypatch, capsys):
    """MLflow's server exits 0 after logging that the port is in use, and shows a traceback for a
    port past 65535: litlab tries the address first and never starts it then."""
    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda exe, cmd: calls.append(cmd))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, error in [
            (["--port", str(port)], f"port {port} on 127.0.0.1 is in use (another `litlab ui` or MLflow server?): "
                                    "choose another with --port N"),
            (["--port", "99999"], "--port 99999: a port is a number from 1 to 65535"),
            (["--port", "0"], "--port 0: a port is a number from 1 to 65535"),
            (["--host", "192.0.2.1"], "--host '192.0.2.1': not an address of this machine (127.0.0.1 for this "
                                      "machine only, 0.0.0.0 for every interface)"),
        ]:
            assert cli.main(["ui", *args]) == 2
            assert capsys.readouterr().err.splitlines() == [f"litlab ui: error: {error}"]
    assert calls == []


@pytest.mark.parametrize("problem", ["unwritable", "full"])
def test_full_or_unwritable_mlruns_is_one_line_before_any_run(problem, tracking_uri, tmp_path, monkeypatch, capsys):
    overrides = [*QUICK]
    if problem == "unwritable":
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("a file where the checkpoint directory should be")
        overrides.append(f"callbacks.checkpoint.dirpath={blocker}/checkpoints")
    else:
        import litlab.preflight as preflight

        monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: type("U", (), {"free": 5 * 2**20})())
    code = cli.main(["run", str(MLP_DIGITS), "--tracking-uri", tracking_uri, *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("litlab run: error: ")
    assert ("cannot write checkpoints" in err[-1]) if problem == "unwritable" else ("MiB free" in err[-1])
    assert not all_runs(tracking_uri, include_deleted=True)  # no run was created
