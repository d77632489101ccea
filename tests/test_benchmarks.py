"""The benchmark scripts a scarce GPU session runs: their configs load and, at tiny sizes on a CPU,
every code path runs (benchmarks/gpu_session.sh -> gpu_all.sh -> throughput.py, then the GPU tests)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO, cli_env
from litlab import runner

sys.path.insert(0, str(REPO / "benchmarks"))


def test_every_benchmark_config_validates():
    """benchmarks/throughput.py's configs (the GPU ones included) load, so a scarce GPU run never
    dies on a config error; `SMOKE=1 bash benchmarks/gpu_all.sh` runs them at tiny sizes."""
    import throughput as tp

    tp.register_bench_data()
    for smoke in (True, False):
        for bench in tp.benches(smoke=smoke, epochs=None).values():
            source = bench.source if isinstance(bench.source, dict) else str(REPO / bench.source)
            runner.load_config(source, [*bench.overrides, *bench.gpu_only_overrides])


def test_a_wrong_override_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--bench", "mlp", "--smoke",
                           "--repeats", "1", "--set", "trainer.max_epoch=3"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "throughput.py: error: mlp (default): trainer.max_epoch" in proc.stderr.splitlines()[-1]


def test_the_profiled_epoch_splits_a_step_into_its_ops_and_the_rest():
    """--profile: an untimed epoch under torch.profiler; a step's time outside torch ops (here a
    2 ms sleep standing for Python) is wall_ms - in_ops_ms; the timed epochs are the ones after it."""
    import time

    import torch
    from bench_clock import EpochClock

    cpu, x = torch.device("cpu"), torch.randn(64, 64)
    clock = EpochClock(warmup_epochs=2, profile_epoch=1)
    for epoch in range(3):
        clock.start(epoch, cpu)
        for _ in range(5):
            (x @ x).relu_()
            time.sleep(0.002)
            clock.step(1)
        clock.stop(cpu)
    profile = clock.profile
    assert profile["steps"] == 5 and "device_busy_ms" not in profile  # no GPU busy time on a CPU
    assert 0 < profile["in_ops_ms"] < 1.0 <= 2.0 <= profile["wall_ms"] - profile["in_ops_ms"], profile
    assert clock.steps == 5 and clock.seconds >= 5 * 0.002  # only the last epoch was timed
    assert clock.epoch_rates == [pytest.approx(5 / clock.seconds)]  # its rate, in samples/s


def test_start_up_phases_are_the_gaps_between_their_ends():
    from bench_report import phase_durations

    marks = {"imports": 105.0, "run set-up": 107.5, "first batch": 107.75}
    assert phase_durations(100.0, marks) == {"imports": 5.0, "run set-up": 2.5, "first batch": 0.25}
    assert list(phase_durations(100.0, marks)) == list(marks)  # in the order they happened


@pytest.mark.slow
def test_the_one_call_gpu_session_runs_its_code_paths(tmp_path):
    """benchmarks/gpu_session.sh (what a scarce GPU session runs) at tiny sizes on this CPU: every
    benchmark row and the start-up times land in gpu.md, the GPU tests' log in gpu_tests.log."""
    out = tmp_path / "out"
    env = {**cli_env(), "SMOKE": "1", "TEST_S": "120", "TEST_WORKERS": "2", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (out / "gpu.md").read_text()
    for row in ("| resnet18 | default", "| resnet18 | notrack", "| gpt2 | default", "| gpt2 | compile"):
        assert row in table, table
    assert "first training step nan" not in table and "first training step" in table
    phases = table.split("first training step", 1)[1].split("\n", 1)[0]  # where the start-up went
    for phase in ("(imports ", "; run set-up ", "; model to device ", "; sanity check ", "; first batch "):
        assert phase in phases, phases
    assert " nan " not in table, table  # every side timed at least one step
    assert "- resnet18 default: hand " in table and "; litlab " in table  # the profiled epoch (--profile)
    for row in (line for line in table.splitlines() if line.startswith("| resnet18 |")):
        paired = row.split("|")[9].strip()  # --paired 1, 3 epochs of which 1 warm-up: 2 pairs
        assert paired.endswith("(2)") and float(paired.split()[0]) > 0, row
    assert sorted(p.name for p in out.iterdir()) == ["gpu.md", "gpu_compile.json", "gpu_gpt2.json", "gpu_pytest.log",
                                                      "gpu_resnet.json", "gpu_tests.log"]  # a device call returns 8
    log = (out / "gpu_tests.log").read_text()  # one line per test (skipped here: no GPU)
    assert "SKIPPED tests/test_gpu.py::test_classifier_learns_under_cuda_graphs" in log, log[-2000:]
    assert "FAILED" not in log and "ERROR" not in log, log[-2000:]
