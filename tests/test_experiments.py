"""Every experiments/**/*.yaml validates and runs end to end (fast_dev_run) through the runner."""

from __future__ import annotations

import pytest

from helpers import EXPERIMENTS, REPO
from litlab import runner


def test_there_are_experiments():
    names = {p.name for p in EXPERIMENTS}
    assert "mlp_digits.yaml" in names and len(names) >= 5


# GPU-sized experiments are validated at full size (load + dry-run config) but trained shrunk:
# experiment file name -> extra overrides applied on top of fast_dev_run.
SHRINK: dict[str, list[str]] = {}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_experiment_runs_with_fast_dev_run(path, tracking_uri):
    runner.load_config(path)  # the file as written validates, whatever its size
    result = runner.run(path, ["trainer.fast_dev_run=true", "tracking.system_metrics=false", *SHRINK.get(path.name, [])],
                        tracking_uri=tracking_uri)
    assert result.status == "FINISHED"
    assert result.metrics, "no test metrics"
