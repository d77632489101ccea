"""Every experiments/**/*.yaml validates and runs end to end (fast_dev_run) through the runner."""

from __future__ import annotations

import pytest

from helpers import DIGITS, EXPERIMENTS, LEARNED_DIGITS, ONLINE_EXPERIMENTS, REPO, unlearned
from litlab import runner


def test_there_are_experiments():
    names = {p.name for p in EXPERIMENTS}
    assert "mlp_digits.yaml" in names and len(names) >= 5


# GPU-sized experiments are validated at full size (load + dry-run config) but trained shrunk:
# experiment file name -> extra overrides applied on top of fast_dev_run.
SHRINK: dict[str, list[str]] = {
    "gpt2_small.yaml": ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.d_ff=64",
                        "model.block_size=32", "data.seq_len=32", "data.batch_size=4", "data.max_chars=20000",
                        "model.sample_length=10", "trainer.precision=32", "trainer.accelerator=cpu"],
}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_experiment_runs_with_fast_dev_run(path, tracking_uri):
    runner.load_config(path)  # the file as written validates, whatever its size
    result = runner.run(path, ["trainer.fast_dev_run=true", "tracking.system_metrics=false", *SHRINK.get(path.name, [])],
                        tracking_uri=tracking_uri)
    assert result.status == "FINISHED"
    assert result.metrics, "no test metrics"
    bars = {name for name, _, _ in LEARNED_DIGITS.get(path.stem, [])}  # what tests/test_gpu.py reads
    assert bars <= set(result.metrics), f"not logged: {sorted(bars - set(result.metrics))}"


def test_every_digits_experiment_has_its_learning_bars():
    """tests/test_gpu.py trains each digits experiment under mixed precision against these bars."""
    assert {p.stem for p in DIGITS} == set(LEARNED_DIGITS)


def test_unlearned_names_each_missed_bar():
    bars = [("test/acc", ">=", 0.9), ("test/loss", "<=", 0.5), ("test/fid", "<=", 20.0)]
    assert unlearned({"test/acc": 0.9, "test/loss": 0.5, "test/fid": 3.0}, bars) == []  # bars are inclusive
    missed = unlearned({"test/acc": 0.85, "test/loss": float("nan")}, bars)
    assert missed == ["test/acc 0.85 (want >= 0.9)", "test/loss nan (want <= 0.5)", "test/fid nan (want <= 20)"]


@pytest.mark.parametrize("path", ONLINE_EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_online_experiment_validates_offline(path):
    """Experiments that download their data (experiments/**/online/) validate without the network."""
    cfg = runner.load_config(path)
    assert cfg.model["name"] and cfg.data["name"]


def test_the_early_checks_accept_every_experiment_and_its_full_config():
    """`litlab run` checks names, arguments and values from the source before importing Lightning:
    it must pass every experiment file (online ones too), and the fully resolved config of each
    (every argument with its value, as a checkpoint stores it for `litlab resume`)."""
    from litlab.early_checks import check_experiment

    for path in [*EXPERIMENTS, *ONLINE_EXPERIMENTS]:
        check_experiment(path, [])
        check_experiment(runner.load_config(path).to_dict(), [])
