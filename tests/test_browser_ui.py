"""The MLflow UI in a real browser: a real `mlflow server` on loopback, two tiny runs and a 2-trial
sweep tracked into it, then headless Chromium loads the pages a student would open and the test
reads the rendered DOM: every run by name, the trials listed (nested: their page names the sweep's
parent run), the metrics with the values MLflow stored. Screenshots of the experiment page and of a
run's page are kept under the test's tmp dir and copied to test-artifacts/ (ignored by git) for CI.

Needs Debian's chromium (.ci/run installs it); skipped without it, except under CI=true.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import urllib.parse

import pytest
from mlflow import MlflowClient

from helpers import MLP_DIGITS, REPO
from mlflow_server import MlflowServer

pytestmark = pytest.mark.slow

TINY = ["model.hidden=[16]", "trainer.max_epochs=1", "tracking.system_metrics=false"]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install --no-install-recommends chromium)")
    return found


def browse(chromium: str, url: str, profile, *, screenshot=None, budget_ms: int = 10000) -> str:
    """Load `url` in headless Chromium, let the page's scripts run for `budget_ms` of virtual time;
    return the rendered DOM (or take a screenshot)."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
    cmd += [f"--screenshot={screenshot}", "--window-size=1600,1600"] if screenshot else ["--dump-dom"]
    proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def page_text(dom: str) -> str:
    """The visible text of a DOM: scripts, styles and tags dropped, whitespace collapsed."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def shown_metric(text: str, name: str) -> float:
    """The value the run page's metrics table shows next to `name`."""
    m = re.search(rf"(?<![\w/]){re.escape(name)} (-?[\d.]+(?:e-?\d+)?)", text)
    assert m, f"{name} not on the page: {text[:1500]}"
    return float(m.group(1))


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "mlflow-server")
    srv.start()
    yield srv
    srv.stop()


def test_runs_metrics_and_sweep_trials_show_in_the_mlflow_ui(chromium, server, tmp_path, monkeypatch, capfd):
    from litlab import runner
    from litlab.sweep import driver

    monkeypatch.chdir(tmp_path)  # checkpoints and the Optuna store stay in the test's directory
    a = runner.run(MLP_DIGITS, TINY, tracking_uri=server.uri, run_name="browser-a")
    b = runner.run(MLP_DIGITS, TINY + ["optim.lr=0.01"], tracking_uri=server.uri, run_name="browser-b")
    sweep = driver.sweep(str(REPO / "sweeps/mlp_digits.yaml"),
                         ["n_trials=2", "overrides.trainer.max_epochs=1", "overrides.tracking.system_metrics=false"],
                         tracking_uri=server.uri, storage=f"sqlite:///{tmp_path}/optuna.db")
    err = capfd.readouterr().err
    assert re.search(r"\[1/2\] trial +\d+ COMPLETE val/acc=[\d.]+ .*best [\d.]+", err), err[-2000:]
    assert re.search(r"\[1/2\] .*best [\d.]+ .*ETA ", err), err[-2000:]  # one trial left: an estimate
    assert re.search(r"\[2/2\] trial +\d+ COMPLETE", err), err[-2000:]

    c = MlflowClient(tracking_uri=server.uri)
    exp = a.experiment_id
    trials = [r for r in c.search_runs([exp]) if r.data.tags.get("mlflow.parentRunId") == sweep.parent_run_id]
    assert len(trials) == 2 and b.experiment_id == exp
    parent_name = c.get_run(sweep.parent_run_id).info.run_name
    names = {r.info.run_id: r.info.run_name for r in c.search_runs([exp])}
    test_acc = {r.info.run_id: r.data.metrics.get("test/acc") for r in c.search_runs([exp])}
    profile = tmp_path / "chromium-profile"

    # The experiment's runs sorted by test/acc: MLflow lists nested runs flat when sorting by a metric.
    order = urllib.parse.quote("metrics.`test/acc`", safe="")
    url = f"{server.uri}/#/experiments/{exp}/runs?orderByKey={order}&orderByAsc=false"
    text = page_text(browse(chromium, url, profile))
    for run_id in (a.run_id, b.run_id, *(t.info.run_id for t in trials), sweep.parent_run_id):
        assert names[run_id] in text, f"run {names[run_id]!r} is not on the experiment page: {text[:2000]}"
    assert "Sort: test/acc" in text
    listed = sorted((rid for rid in names if test_acc[rid] is not None), key=lambda rid: text.index(f" {names[rid]} "))
    assert [test_acc[rid] for rid in listed] == sorted(test_acc[rid] for rid in listed)[::-1], \
        "the page does not list the runs by test/acc, best first"

    # Each run's page shows its metrics with the values MLflow stored; a trial's names its parent.
    for run in (a, b):
        text = page_text(browse(chromium, f"{server.uri}/#/experiments/{exp}/runs/{run.run_id}", profile))
        assert names[run.run_id] in text
        for metric in ("test/acc", "test/loss", "val/acc"):
            assert shown_metric(text, metric) == pytest.approx(c.get_run(run.run_id).data.metrics[metric], abs=1e-6)
    trial = trials[0].info
    text = page_text(browse(chromium, f"{server.uri}/#/experiments/{exp}/runs/{trial.run_id}", profile))
    assert f"Parent run {parent_name}" in text and trial.run_name in text
    assert shown_metric(text, "test/acc") == pytest.approx(test_acc[trial.run_id], abs=1e-6)

    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")  # test output, never committed
    for name, page in [("mlflow_experiment_runs.png", url),
                       ("mlflow_run_page.png", f"{server.uri}/#/experiments/{exp}/runs/{a.run_id}")]:
        shot = tmp_path / name
        browse(chromium, page, profile, screenshot=shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000  # not a blank page
        shutil.copy(shot, ARTIFACTS / name)
