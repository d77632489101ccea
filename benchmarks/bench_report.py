"""The report of benchmarks/throughput.py: the device's name, the start-up times (`litlab --help`,
`litlab models`, `litlab run` to its first training step) and the results as a markdown table
and JSON."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s)"


# ------------------------------------------------------------------------------------ start-up time
def startup_time(args) -> dict:
    """Seconds from launching `litlab run` (a new process) to its first training step, and of
    `litlab --help` and `litlab models`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "platform"), os.environ.get("PYTHONPATH")]))}
    out = {}
    for name, cmd in (("help", ["--help"]), ("models", ["models"])):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "litlab", *cmd], env=env, capture_output=True, check=True)
        out[f"litlab_{name}_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="litlab-start-") as tmp:
        probe = Path(tmp) / "first_step.py"
        probe.write_text(FIRST_STEP_PROBE)
        t0 = time.time()
        p = subprocess.run([sys.executable, str(probe), str(REPO / "experiments/mlp/mlp_digits.yaml"),
                            f"sqlite:///{tmp}/mlflow.db", args.device, str(int(args.mlflow))], env=env, cwd=tmp,
                           capture_output=True, text=True)
        if p.returncode != 0:
            print(f"start-up probe failed: {p.stderr.strip()[-500:]}", file=sys.stderr)
            out["run_to_first_step_s"] = float("nan")
        else:
            marks = json.loads(p.stdout.strip().splitlines()[-1])  # {phase: time.time() at its end}
            out["run_to_first_step_s"] = marks["first batch"] - t0
            out["run_phases_s"] = phase_durations(t0, marks)
    return out


def phase_durations(t0: float, marks: dict[str, float]) -> dict[str, float]:
    """Seconds each start-up phase took, from the wall-clock times at which each ended (in order)."""
    durations, last = {}, t0
    for phase, end in marks.items():
        durations[phase], last = end - last, end
    return durations


# `litlab run` in a fresh interpreter, stopped at its first training step; prints, as JSON, when
# each phase ended: "imports" (interpreter, Lightning, litlab's runner), "run set-up" (config checks,
# the tracking run, the Trainer, DataModule.setup: up to the callbacks' setup), "model to device"
# (and the optimisers: on_fit_start), "sanity check" (on_train_start), "first batch" (its fetch).
FIRST_STEP_PROBE = """
import json, sys, time
import lightning as L
from litlab import runner

marks = {"imports": time.time()}

class FirstStepReached(Exception):
    pass

class FirstStep(L.Callback):
    def setup(self, trainer, pl_module, stage):
        marks["run set-up"] = time.time()
    def on_fit_start(self, trainer, pl_module):
        marks["model to device"] = time.time()
    def on_train_start(self, trainer, pl_module):
        marks["sanity check"] = time.time()
    def on_train_batch_start(self, trainer, *args):
        marks["first batch"] = time.time()
        print(json.dumps(marks), flush=True)
        raise FirstStepReached  # not KeyboardInterrupt: Lightning would exit(1) on it

acc = "gpu" if sys.argv[3].startswith("cuda") else "cpu"
track = [] if sys.argv[4] == "1" else ["tracking.mlflow=false"]
try:
    runner.run(sys.argv[1], ["trainer.max_epochs=1", f"trainer.accelerator={acc}", *track],
               tracking_uri=sys.argv[2], callbacks=[FirstStep()], quiet=True)
except FirstStepReached:
    pass
"""


# ------------------------------------------------------------------------------------ report
def markdown(rows: list[dict], startup: dict | None) -> str:
    lines = ["| benchmark | variant | device | hand loop | litlab | litlab / hand | of the medians | of the best epochs "
             "| paired epochs, median (pairs) | peak mem hand / litlab (MiB) | MFU hand / litlab |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        mem = r["peak_mem_mib"]
        mem_s = f"{mem['hand']:.0f} / {mem['litlab']:.0f}" if mem else "-"
        mfu = r.get("mfu")
        mfu_s = f"{100 * mfu['hand']:.1f}% / {100 * mfu['litlab']:.1f}%" if mfu else "-"
        # the best repeats' ratio, and the ratio of the medians: on a noisy host the two bracket it
        median = statistics.median(r["litlab_all"]) / statistics.median(r["hand_all"])
        # and the best single epoch's (one window of each side's least-disturbed steps)
        epochs = r.get("hand_epochs") and r.get("litlab_epochs")
        best_epoch = f"{max(r['litlab_epochs']) / max(r['hand_epochs']):.3f}" if epochs else "-"
        # and epoch beside epoch (--paired): the median of litlab / hand over adjacent pairs of epochs
        pairs = r.get("paired_ratios")
        paired = f"{statistics.median(pairs):.3f} ({len(pairs)})" if pairs else "-"
        lines.append(f"| {r['bench']} | {r['variant']} | {r['device']} | {r['hand']:,.0f} {r['unit']} | "
                     f"{r['litlab']:,.0f} {r['unit']} | {r['ratio']:.3f} | {median:.3f} | {best_epoch} | {paired} | {mem_s} | {mfu_s} |")
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        lines.append("")
        lines.append("profiled epoch (`--profile`), per step: wall / host time in torch ops / GPU busy (ms)")
        for r in profiled:
            sides = [f"{side} " + " / ".join(f"{p[k]:.3f}" for k in ("wall_ms", "in_ops_ms", "device_busy_ms") if k in p)
                     for side, p in sorted(r["profile"].items())]
            lines.append(f"- {r['bench']} {r['variant']}: " + "; ".join(sides))
            differ = ops_that_differ(r["profile"])
            if differ:
                lines.append("  calls per step, litlab - hand: " + ", ".join(differ))
    peaks = {r["peak"] for r in rows if "peak" in r}
    if peaks:
        lines.append("")
        lines.append("MFU = 6 x N x tokens/s / peak (N = parameters without the position table); peak: "
                     + "; ".join(sorted(peaks)))
    if rows:
        import lightning

        lines.append("")
        lines.append(f"best of {rows[0]['repeats']} interleaved repeats (a repeat: every timed epoch of one run), "
                     f"{rows[0]['clock']} clock; torch {torch.__version__}, "
                     f"lightning {lightning.__version__}")
    if startup:
        lines.append("")
        lines.append(f"start-up: `litlab --help` {startup['litlab_help_s']:.2f} s, `litlab models` "
                     f"{startup['litlab_models_s']:.2f} s, `litlab run` to the first training step "
                     f"{startup['run_to_first_step_s']:.2f} s")
        if startup.get("run_phases_s"):
            lines[-1] += " (" + "; ".join(f"{phase} {s:.2f} s" for phase, s in startup["run_phases_s"].items()) + ")"
    return "\n".join(lines) + "\n"


def ops_that_differ(profile: dict, most: int = 10) -> list[str]:
    """The ops whose calls per step differ between the profiled epochs of the two sides, the
    largest differences first: "aten::copy_ +2.0"."""
    if "ops" not in profile.get("hand", {}) or "ops" not in profile.get("litlab", {}):
        return []
    hand, lit = profile["hand"]["ops"], profile["litlab"]["ops"]
    diff = {op: lit.get(op, [0])[0] - hand.get(op, [0])[0] for op in {*hand, *lit}}
    big = sorted((op for op, d in diff.items() if abs(d) >= 0.5), key=lambda op: (-abs(diff[op]), op))
    return [f"{op} {diff[op]:+.1f}" for op in big[:most]]


def write_outputs(paths: list[str], rows: list[dict], startup: dict | None) -> str:
    text = markdown(rows, startup)
    for path in paths:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rows": rows, "startup": startup}, indent=2) if out.suffix == ".json" else text)
    return text
