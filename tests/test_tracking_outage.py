"""A tracking-server outage never stops training and loses no metric point.

A real `mlflow server` (one worker, loopback) is stopped while a `litlab run` trains against it:
training goes on, the points wait in the run's local spool, and when the server is back they are
sent; at the end MLflow holds exactly the points of an identical run against a healthy store. If the
server is still down when the run ends, the status and points wait for `litlab sync RUN_ID`."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import MLP_DIGITS, cli_env, litlab_cmd, run_cli
from litlab import runner, tracking
from litlab.server_probe import unreachable
from mlflow_server import MlflowServer, free_port

pytestmark = pytest.mark.slow
SETTINGS = ["model.hidden=[32]", "data.batch_size=16", "trainer.max_epochs=6", "trainer.log_every_n_steps=1",
            "tracking.system_metrics=false", "tracking.flush_interval=0.2", "tracking.log_checkpoints=false"]


def _points(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    c = MlflowClient(tracking_uri=uri)
    return {k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, k)) for k in c.get_run(run_id).data.metrics}


def _start(uri: str, cwd: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(litlab_cmd("run", str(MLP_DIGITS), "--tracking-uri", uri, *SETTINGS, *extra), cwd=cwd,
                            env=cli_env(OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("litlab: started run "):
            return proc, line.split()[3]
    proc.wait()
    raise AssertionError(f"no run started (exit {proc.returncode})")


def _wait_for_spool_growth(spool: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Training goes on while the server is down: the spool keeps growing."""
    deadline = time.time() + timeout
    size = spool.stat().st_size if spool.exists() else 0
    while time.time() < deadline and proc.poll() is None:
        if spool.exists() and spool.stat().st_size > size + 2000:
            return
        time.sleep(0.05)
    assert proc.poll() is None or proc.returncode == 0, proc.stderr.read()[-2000:] if proc.stderr else ""


@pytest.fixture
def reference(tmp_path_factory, monkeypatch):
    """The same run against a healthy local store: the points MLflow must end up with."""
    root = tmp_path_factory.mktemp("reference")
    monkeypatch.chdir(root)
    uri = f"sqlite:///{root}/mlflow.db"
    result = runner.run(MLP_DIGITS, SETTINGS, tracking_uri=uri)
    return _points(uri, result.run_id)


def test_training_survives_a_server_outage_and_every_point_arrives(tmp_path, reference):
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        proc, run_id = _start(server.uri, tmp_path)
        spool = tmp_path / "mlruns" / "spool" / f"{run_id}.jsonl"
        server.stop()  # outage in the middle of training
        _wait_for_spool_growth(spool, proc)
        server.start()  # back before the run ends (or while it waits for the final flush)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        # (the "tracking server unreachable" warning may not show: MLflow's own retries can bridge a
        # short outage; what must hold is that training went on and nothing was lost)
        c = MlflowClient(tracking_uri=server.uri)
        assert c.get_run(run_id).info.status == "FINISHED"
        assert _points(server.uri, run_id) == reference  # same keys, steps and values: nothing lost, nothing twice
        assert not spool.exists()  # everything was sent
    finally:
        server.stop()


def test_a_run_ending_during_the_outage_is_completed_by_litlab_sync(tmp_path, reference):
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        proc, run_id = _start(server.uri, tmp_path, "tracking.flush_timeout=1")
        server.stop()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]  # training finished although nothing could be sent
        assert f"litlab sync {run_id}" in err
        server.start()
        assert MlflowClient(tracking_uri=server.uri).get_run(run_id).info.status == "RUNNING"
        synced = run_cli("sync", run_id, "--tracking-uri", server.uri, cwd=tmp_path)
        assert synced.returncode == 0, synced.stderr[-2000:]
        assert MlflowClient(tracking_uri=server.uri).get_run(run_id).info.status == "FINISHED"
        assert _points(server.uri, run_id) == reference
        assert "nothing to send" in run_cli("sync", "--tracking-uri", server.uri, cwd=tmp_path).stderr
    finally:
        server.stop()


def test_a_server_that_refuses_connections_costs_no_retries(tmp_path, monkeypatch):
    """MLflow's client retries a refused connection for 7 s per call (litlab's settings): a run ending
    during an outage would wait that long for each flush, figure, file and its status, whatever its
    flush_timeout. A TCP probe answers at once; everything goes to the spool."""
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    uri, run_id = f"http://127.0.0.1:{free_port()}", "f" * 32  # nothing listens there
    assert unreachable(uri).startswith("cannot connect to 127.0.0.1:")
    tracker = tracking.MlflowTracker(uri, run_id, flush_interval=60, spool_dir=tmp_path / "mlruns" / "spool",
                                     flush_timeout=1.0)
    try:
        tracker.log_metrics({"train/loss": 1.0}, step=0)
        start = time.monotonic()
        tracker.finalize("success")  # the end of fit: one attempt, no wait
        assert time.monotonic() - start < 0.5
        start = time.monotonic()
        assert tracker.flush() is False and tracker.unreachable
        assert time.monotonic() - start < 2.5  # flush_timeout = 1 s, not 7 s per attempt
        (tmp_path / "notes.txt").write_text("kept")
        figure = plt.figure()
        start = time.monotonic()
        tracker.log_artifact(str(tmp_path / "notes.txt"), "files")
        tracker.log_figure(figure, "plots/empty.png")
        assert not tracking.end_run(uri, run_id, "FINISHED")
        assert time.monotonic() - start < 1.5
        assert [Path(p).name for p, _ in tracker.spool.pending_artifacts()] == ["notes.txt", "empty.png"]
        assert tracker.spool.pending_status() == "FINISHED" and tracker.spool.pending_points() == 1
    finally:
        tracker.close()


def test_the_probe_leaves_proxied_and_local_stores_to_mlflow(monkeypatch):
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert unreachable(f"http://10.255.255.1:{free_port()}") is None  # only the proxy could tell
    assert unreachable("sqlite:///mlruns/mlflow.db") is None and unreachable("databricks") is None
