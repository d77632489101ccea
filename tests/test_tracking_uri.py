"""A tracking URI MLflow cannot use is one line and exit status 2, from every command, before any run.

An unknown scheme, a path without a scheme (MLflow 3 refuses its file store), a `file:` URI, a typo
such as `http//host:5000`, and an http(s) server that does not answer: each was a traceback with
exit status 1 (after 8 to 14 s of MLflow's retries for the server), whether the URI came from
--tracking-uri, tracking.tracking_uri in the config or MLFLOW_TRACKING_URI."""

from __future__ import annotations

import time

import pytest

from helpers import MLP_DIGITS, REPO
from litlab import tracking_store
from litlab.cli import main
from litlab.errors import UserError
from litlab.tracking_uri import check_tracking_uri
from mlflow_server import free_port

QUICK_RUN = ["model.hidden=[8]", "trainer.max_epochs=1", "tracking.system_metrics=false"]
BAD = {  # uri -> what its line must say
    "notascheme://x": "unknown scheme 'notascheme://'; MLflow supports sqlite:///PATH/mlflow.db, postgresql://",
    "http//localhost:5000": "did you mean http://localhost:5000?",
    "file:///proc/mlruns": "MLflow 3 refuses that file store; give sqlite:////proc/mlruns/mlflow.db",
    "mlruns": "has no scheme, so MLflow takes it for a directory: MLflow 3 refuses that file store; "
              "give sqlite:///mlruns/mlflow.db",
    "localhost:5000": "did you mean http://localhost:5000?",
    "http:/localhost:5000": "no host; did you mean http://localhost:5000?",
    "http://localhost:http": "the port is not a number",
}


def _one_line(code, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err[-3000:])
    return lines[0]


def _dead_server() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.mark.parametrize("uri", sorted(BAD))
def test_check_tracking_uri_names_the_uri_and_the_problem(uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(UserError) as e:
        check_tracking_uri(uri)
    assert str(e.value).startswith(f"tracking URI {uri!r}") and BAD[uri] in str(e.value), str(e.value)


def test_check_tracking_uri_accepts_what_mlflow_opens(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in ("sqlite:///mlruns/mlflow.db", f"sqlite:///{tmp_path}/mlflow.db", "postgresql://u@db.example/x",
                "postgresql+psycopg2://u:pw@127.0.0.1:5432/x", "mysql+pymysql://u@h/x", "mssql+pyodbc://u@dsn",
                "http://127.0.0.1:5000", "https://mlflow.example.org", "databricks", "databricks://profile",
                "databricks-uc", "uc:http://localhost:8080"):
        check_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-in to its file store
    check_tracking_uri("./mlruns")
    check_tracking_uri(f"file://{tmp_path}")


def test_a_password_in_a_bad_uri_is_masked():
    with pytest.raises(UserError) as e:
        check_tracking_uri("postgresql:u:hunter22@h/db")
    assert "hunter22" not in str(e.value) and "a database URI looks like postgresql://" in str(e.value)
    with pytest.raises(UserError) as e:
        check_tracking_uri("http//u:hunter22@h:5000")
    assert "hunter22" not in str(e.value) and "did you mean http://u:***@h:5000?" in str(e.value)
    with pytest.raises(UserError) as e:
        tracking_store.client(f"postgresql://u:hunter22@127.0.0.1:{free_port()}/db")
    assert "hunter22" not in str(e.value) and "no server answering" in str(e.value)


@pytest.mark.parametrize("uri", sorted(BAD))
@pytest.mark.parametrize("command", [["runs"], ["compare", "abcdef12"], ["resume", "abcdef1234"]])
def test_runs_compare_resume_refuse_a_bad_uri_in_one_line(command, uri, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _one_line(main([*command, "--tracking-uri", uri]), capsys.readouterr().err)
    assert line.startswith(f"litlab {command[0]}: error: tracking URI {uri!r}") and BAD[uri] in line, line
    assert "no run" not in line  # resume said "no run 'abcdef1234' in the tracking store notascheme://x"


def test_the_uri_from_the_environment_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "notascheme://x")
    line = _one_line(main(["runs"]), capsys.readouterr().err)
    assert "tracking URI 'notascheme://x' (from MLFLOW_TRACKING_URI): unknown scheme" in line


def test_a_server_that_does_not_answer_is_one_line_at_once(capsys, tmp_path, monkeypatch):
    """The probe (server_probe) ran only before calls during a run; `runs`, `compare`, `resume` and the
    start of `run` went to MLflow, which retried for 8 to 14 s and ended in a 117-line traceback."""
    monkeypatch.chdir(tmp_path)
    uri = _dead_server()
    for command in (["runs"], ["compare", "abcdef12", "abcdef34"], ["resume", "abcdef1234"]):
        start = time.monotonic()
        line = _one_line(main([*command, "--tracking-uri", uri]), capsys.readouterr().err)
        assert time.monotonic() - start < 2.0, command
        assert f"tracking URI '{uri}': no server answering at that address (cannot connect to" in line, line


def test_litlab_run_refuses_a_bad_or_dead_tracking_uri_before_any_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("notascheme://x", "http//localhost:5000", "file:///proc/mlruns", _dead_server()):
        line = _one_line(main(["run", str(MLP_DIGITS), "--tracking-uri", uri, *QUICK_RUN]), capsys.readouterr().err)
        assert line.startswith(f"litlab run: error: tracking URI {uri!r}"), line
    line = _one_line(main(["run", str(MLP_DIGITS), "tracking.tracking_uri=notascheme://x", *QUICK_RUN]),
                     capsys.readouterr().err)
    assert "tracking URI 'notascheme://x': unknown scheme" in line
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///proc/mlruns")
    line = _one_line(main(["run", str(MLP_DIGITS), *QUICK_RUN]), capsys.readouterr().err)
    assert "(from MLFLOW_TRACKING_URI)" in line and "refuses that file store" in line
    assert not list((tmp_path / "mlruns").glob("checkpoints/*"))  # no run got as far as a checkpoint directory


def test_a_dead_server_is_refused_before_the_run_is_created(capsys, tmp_path, monkeypatch):
    """The server probe now answers when the store is first opened (start_run's client), not MLflow's
    retries when the run is created."""
    monkeypatch.chdir(tmp_path)
    tracking_store._answered.clear()
    with pytest.raises(UserError, match="no server answering"):
        tracking_store.start_run(_dead_server(), "e", "r", {}, {}, "")


def test_litlab_sweep_refuses_a_bad_tracking_uri_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["sweep", str(REPO / "sweeps" / "mlp_digits.yaml"), "--n-trials", "1", "--tracking-uri",
                 "notascheme://x", "--storage", f"sqlite:///{tmp_path}/optuna.db"])
    assert "unknown scheme 'notascheme://'" in _one_line(code, capsys.readouterr().err)



def test_an_untracked_run_does_not_check_the_tracking_uri(tmp_path, monkeypatch):
    """tracking.mlflow=false uses no store: an old MLFLOW_TRACKING_URI=./mlruns (a file store) in the
    environment must not stop it. (Needs runner.run to resolve the URI only when tracking.)"""
    from litlab import runner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    result = runner.run(MLP_DIGITS, [*QUICK_RUN, "tracking.mlflow=false"])
    assert result.status == "FINISHED" and result.experiment_id is None
