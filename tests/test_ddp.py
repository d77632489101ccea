"""DDP on 2 CPU processes (gloo) trains once and yields exactly ONE MLflow run."""

from __future__ import annotations

import pytest

from helpers import MLP_DIGITS, QUICK, all_runs, run_cli


@pytest.mark.slow
def test_ddp_two_cpu_processes_one_run(tracking_uri, tmp_path):
    proc = run_cli("run", str(MLP_DIGITS), "--tracking-uri", tracking_uri, *QUICK, "tracking.system_metrics=false",
                   "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = all_runs(tracking_uri)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert "x2" in run.data.tags["device"] and "ddp" in run.data.tags["device"]
    assert "test/acc" in run.data.metrics
    assert proc.stdout.count(f"run {run.info.run_id} FINISHED") == 1  # only rank 0 reports
