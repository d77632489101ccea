"""litlab against a hand-written PyTorch loop: the same model, data and optimiser, side by side.

    PYTHONPATH=platform python benchmarks/throughput.py --bench mlp --repeats 5
    PYTHONPATH=platform python benchmarks/throughput.py --bench all --device cuda --out /tmp/throughput.md
    PYTHONPATH=platform python benchmarks/throughput.py --bench all --smoke      # tiny sizes, any device

For each benchmark, in ONE process, interleaved, `--repeats` times: a raw loop (hand_loop.py: tensors indexed by
hand, `opt.zero_grad(); loss.backward(); opt.step(); sched.step()`) and `litlab.runner.run()` of the
experiment config with litlab's defaults (tracking, checkpoints, monitors, guards all on). Only
training steps are timed: from the start of the first step of each epoch to the end of its last
step (validation and checkpoint writes at the epoch end are outside both clocks), after
`--warmup-epochs` epochs; throughput = timed samples (tokens for GPT) / timed seconds. The best
repeat of each side is reported (the machine is shared: the best is the least disturbed), with the
ratio litlab / hand loop, peak device memory, MFU for GPT (6 N tokens/s over the peak named in the
table) and the time from `litlab run` (a fresh process) to the first training step.

Benchmarks (model and data exactly as in the YAML, training length set here):
  mlp       experiments/mlp/mlp_digits.yaml      digits 8x8, MLP 64-128-64-10, batch 64
  lenet     experiments/cnn/lenet_digits.yaml    digits 32x32 with shift augmentation, batch 64
  resnet18  the `resnet` model (depth 18, stem cifar) on synthetic 32x32x3 images, batch 512, bf16
  gpt2      experiments/transformer/gpt2_small.yaml  (86M parameters, 16 x 1024 byte tokens, bf16)
Variants (--variants): default, notrack (tracking.mlflow=false), compile (trainer.compile=true vs
a torch.compile'd hand loop), lightning_loop (trainer.fast_loop=false: Lightning's own training
loop, everything else as default; shows what the lean step saves).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "platform"))  # after PYTHONPATH: another litlab (e.g. a baseline checkout) may go first

import torch  # noqa: E402

from bench_clock import EpochClock, lightning_clock_callback  # noqa: E402  (beside this file)
from bench_report import device_name, startup_time, write_outputs  # noqa: E402
from hand_loop import hand_epochs, hand_side  # noqa: E402

from litlab.schema import Range  # noqa: E402  (module level: BenchImages' string annotations resolve here)

# Dense bf16 peaks (no sparsity) used for MFU, from the vendors' data sheets; the first key the
# device name contains wins (the H100 PCIe and NVL before the SXM's plain "H100").
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}


# ------------------------------------------------------------------------------------ benchmarks
VARIANTS = ("default", "notrack", "compile", "lightning_loop")


@dataclass
class Bench:
    name: str
    source: str | dict  # experiment YAML (relative to the repo) or a config dict
    overrides: list[str]
    kind: str  # "classify" (x, y) -> cross-entropy over classes | "lm": (B, T) ids -> next-token CE
    gpu_only_overrides: list[str] = field(default_factory=list)


def synthetic_images_config(smoke: bool) -> dict:
    return {
        "name": "bench_resnet18",
        "seed": 0,
        "model": {"name": "resnet", "depth": 18, "stem": "cifar", "width": 0.0625 if smoke else 1.0},
        "data": {"name": "bench_images", "n_train": 64 if smoke else 512 * 48, "n_val": 32 if smoke else 1024,
                 "image_size": 16 if smoke else 32, "batch_size": 16 if smoke else 512},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                  "scheduler": {"name": "cosine"}},
        "trainer": {"max_epochs": 4},
        "callbacks": {"checkpoint": {"monitor": "val/acc", "mode": "max"}},
    }


def benches(smoke: bool, epochs: int | None) -> dict[str, Bench]:
    e = epochs
    # the end-of-run upload of the checkpoints to MLflow (GPT-2: 2 x 1 GB) is outside the timed steps
    no_upload = ["tracking.log_checkpoints=false"]
    gpt_smoke = ["model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.d_ff=64", "model.block_size=64",
                 "data.seq_len=64", "data.batch_size=4", "data.max_chars=15000", "model.sample_length=8"]
    return {
        "mlp": Bench("mlp", "experiments/mlp/mlp_digits.yaml", [f"trainer.max_epochs={e or (3 if smoke else 20)}"],
                     "classify"),
        "lenet": Bench("lenet", "experiments/cnn/lenet_digits.yaml", [f"trainer.max_epochs={e or (3 if smoke else 16)}"],
                       "classify"),
        "resnet18": Bench("resnet18", synthetic_images_config(smoke), [f"trainer.max_epochs={e or 3}"],
                          "classify", gpu_only_overrides=["trainer.precision=bf16-mixed", *no_upload]),
        "gpt2": Bench("gpt2", "experiments/transformer/gpt2_small.yaml",
                      [f"trainer.max_epochs={e or (3 if smoke else 2)}", "model.sample_length=16",
                       *(gpt_smoke if smoke else [])], "lm", gpu_only_overrides=no_upload),
    }


def register_bench_data() -> None:
    """`bench_images`: seeded random 32x32x3 images and labels, CIFAR-10 sized, in memory."""
    from litlab.data.base import LitlabDataModule
    from litlab.data.memory import FastLoaderMixin, TensorBatchDataset
    from litlab.registry import DATA, register_data

    if "bench_images" in DATA:
        return

    @register_data("bench_images", description="random CIFAR-sized images (benchmarks only)")
    class BenchImages(FastLoaderMixin, LitlabDataModule):
        def __init__(self, batch_size: Annotated[int, Range(ge=1)] = 512, num_workers: int = 0,
                     n_train: Annotated[int, Range(ge=1)] = 12288, n_val: Annotated[int, Range(ge=1)] = 1024,
                     image_size: Annotated[int, Range(ge=4)] = 32, num_classes: Annotated[int, Range(ge=2)] = 10):
            super().__init__(batch_size=batch_size, num_workers=num_workers)
            self.n_train, self.n_val, self.image_size, self.num_classes = n_train, n_val, image_size, num_classes

        def info(self):
            return {"input_shape": (3, self.image_size, self.image_size), "num_classes": self.num_classes}

        def setup(self, stage=None):
            if self.train_set is not None:
                return
            g = torch.Generator().manual_seed(1234)
            sets = []
            for n in (self.n_train, self.n_val, self.n_val):
                x = torch.randn(n, 3, self.image_size, self.image_size, generator=g)
                sets.append(TensorBatchDataset(x, torch.randint(0, self.num_classes, (n,), generator=g)))
            self.train_set, self.val_set, self.test_set = sets


# ------------------------------------------------------------------------------------ the two sides
def litlab_side(cfg, clock: EpochClock, samples_of, tracking_uri: str) -> dict:
    from litlab import runner

    cb = lightning_clock_callback(clock, samples_of)
    runner.run(cfg, tracking_uri=tracking_uri, callbacks=[cb])  # as `litlab run` (progress lines included)
    return {}


def paired_side(cfg, bench: Bench, hand_clock: EpochClock, lit_clock: EpochClock, device: torch.device,
                samples_of, tracking_uri: str, compile_net: bool) -> None:
    """One litlab run with the hand loop's epochs run between its own, alternating which side goes
    first (H0 L0 | L1 H1 | H2 L2 | ...): each pair of epochs runs on the host as it is at that
    moment, so the per-pair ratios are free of the drift that separate runs see (--paired)."""
    import lightning as L

    hand = hand_epochs(cfg, bench, hand_clock, device, compile_net)

    def hand_epoch() -> None:
        with torch.enable_grad():
            next(hand, None)

    class HandEpochs(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch % 2 == 0:
                hand_epoch()

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch % 2 == 1:
                hand_epoch()

    from litlab import runner

    runner.run(cfg, tracking_uri=tracking_uri, callbacks=[lightning_clock_callback(lit_clock, samples_of), HandEpochs()])
    hand.close()  # epochs litlab did not reach (it stopped early) are not run: every pair is a pair


# ------------------------------------------------------------------------------------ one benchmark
def paired_run(bench: Bench, cfg, args, device: torch.device, variant: str, samples_of, tmp: str, r: int) -> list[float]:
    """One --paired run: litlab / hand loop of each timed pair of epochs (see paired_side)."""
    clocks = {side: EpochClock(args.warmup_epochs, args.clock) for side in ("hand", "litlab")}
    gc.collect()
    paired_side(cfg, bench, clocks["hand"], clocks["litlab"], device, samples_of, f"sqlite:///{tmp}/mlflow.db",
                compile_net=variant == "compile")
    ratios = [lit / hand for lit, hand in zip(clocks["litlab"].epoch_rates, clocks["hand"].epoch_rates)]
    print(f"  {bench.name:<9} {variant:<8} paired run {r + 1}: litlab / hand per epoch "
          + " ".join(f"{x:.3f}" for x in ratios), file=sys.stderr, flush=True)
    return ratios


def param_count(cfg) -> int:
    from litlab import registry

    module = registry.get_model(cfg.model["name"]).cls(**{k: v for k, v in cfg.model.items() if k != "name"})
    net = module.net
    n = sum(p.numel() for p in net.parameters())
    pos = getattr(getattr(net, "pos", None), "weight", None)  # learned positions: no matmul FLOPs
    return n - (pos.numel() if pos is not None else 0)


def device_peak_tflops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "n/a (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops, f"{name}: {tflops:g} TFLOP/s dense bf16"
    return None, f"{name}: peak unknown"


def measure(bench: Bench, args, variant: str) -> dict:
    from litlab import runner

    device = torch.device(args.device)
    overrides = [*bench.overrides, f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
                 "tracking.system_metrics=true"]
    if device.type == "cuda":
        overrides += bench.gpu_only_overrides
    else:
        overrides += ["trainer.precision=32"]
    overrides += getattr(args, "overrides", [])
    if variant == "notrack" or not args.mlflow:
        overrides.append("tracking.mlflow=false")
    if variant == "compile":
        overrides.append("trainer.compile=true")
    if variant == "lightning_loop":
        overrides.append("trainer.fast_loop=false")
    source = bench.source if isinstance(bench.source, dict) else str(REPO / bench.source)
    cfg = runner.load_config(source, overrides)
    tokens = bench.kind == "lm"
    samples_of = (lambda b: b[0].numel()) if tokens else (lambda b: len(b[0]))
    results: dict[str, list] = {"hand": [], "litlab": []}
    epochs: dict[str, list] = {"hand": [], "litlab": []}  # every timed epoch's rate, all repeats
    mem: dict[str, int] = {}
    profiles: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="litlab-bench-") as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # checkpoints and the tracking store go to a throw-away directory
        try:
            for r in range(args.repeats):
                for side in (("hand", "litlab") if r % 2 == 0 else ("litlab", "hand")):
                    profiled = args.profile and r == 0  # the epoch after the warm-up: profiled, untimed
                    clock = EpochClock(args.warmup_epochs + profiled, args.clock,
                                       args.warmup_epochs if profiled else None)
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    if side == "hand":
                        hand_side(cfg, bench, clock, device, compile_net=variant == "compile")
                    else:
                        litlab_side(cfg, clock, samples_of, f"sqlite:///{tmp}/mlflow.db")
                    if device.type == "cuda":
                        mem[side] = max(mem.get(side, 0), torch.cuda.max_memory_allocated(device))
                    rate = clock.samples / clock.seconds if clock.seconds else float("nan")
                    results[side].append(rate)
                    epochs[side].extend(clock.epoch_rates)
                    if clock.profile:
                        profiles[side] = clock.profile
                    print(f"  {bench.name:<9} {variant:<8} repeat {r + 1}: {side:<6} {rate:12,.0f} "
                          f"{'tokens' if tokens else 'samples'}/s ({clock.steps} steps in {clock.seconds:.3f} s)",
                          file=sys.stderr, flush=True)
            pairs = [paired_run(bench, cfg, args, device, variant, samples_of, tmp, r) for r in range(args.paired)]
        finally:
            os.chdir(cwd)
    hand, lit = max(results["hand"]), max(results["litlab"])
    label = variant if args.mlflow or variant == "notrack" else f"{variant} (mlflow missing: untracked)"
    row = {"bench": bench.name, "variant": label, "clock": args.clock, "device": device_name(device), "unit": "tokens/s" if tokens else "samples/s",
           "hand": hand, "litlab": lit, "ratio": lit / hand, "repeats": args.repeats,
           "hand_all": results["hand"], "litlab_all": results["litlab"],
           "hand_epochs": epochs["hand"], "litlab_epochs": epochs["litlab"],
           "peak_mem_mib": {k: v / 2**20 for k, v in mem.items()}}
    if profiles:
        row["profile"] = profiles
    if pairs:
        row["paired_ratios"] = [ratio for run in pairs for ratio in run]  # litlab / hand, epoch by epoch
    if tokens:
        n = param_count(cfg)
        peak, peak_name = device_peak_tflops(device)
        row["params_non_embedding_pos"] = n
        row["peak"] = peak_name
        if peak:
            row["mfu"] = {k: 6 * n * row[k] / (peak * 1e12) for k in ("hand", "litlab")}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", nargs="+", default=["mlp"], metavar="NAME[:VARIANTS]",
                   help="mlp, lenet, resnet18, gpt2 or all; NAME:v1,v2 gives that benchmark its own variants")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, help="training epochs of every run (default: per benchmark)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time (default) or the training thread's CPU time (for A/B tests on a busy CPU)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="epochs not timed")
    p.add_argument("--variants", default="default", help="comma-separated: default, notrack, compile, lightning_loop")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config overrides for every run (e.g. tracking.system_metrics=false), after the benchmark's")
    p.add_argument("--paired", type=int, default=0, metavar="N",
                   help="also N runs of litlab with the hand loop's epochs between its own (alternating "
                        "which goes first): the median ratio of these pairs of epochs, steady on a drifting host")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code paths, measures nothing")
    p.add_argument("--profile", action="store_true", help="in the first repeat, the epoch after the warm-up runs untimed "
                   "under torch.profiler: wall, host time in ops and GPU busy time per step")
    p.add_argument("--startup", action="store_true", help="also time `litlab --help`, `litlab models` and "
                                                          "`litlab run` to its first step")
    p.add_argument("--out", nargs="+", default=[], metavar="FILE", help="write the results to FILE.json and/or "
                                                                        "FILE.md (rewritten after every benchmark)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "mlflow", "alembic"):  # chatter, not costs
        logging.getLogger(name).setLevel(logging.ERROR)
    if torch.device(args.device).type == "cuda":  # what a careful hand loop sets (litlab: trainer.matmul_precision)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    args.mlflow = importlib.util.find_spec("mlflow") is not None
    if not args.mlflow:
        print("mlflow is not installed: litlab runs with tracking.mlflow=false", file=sys.stderr)
    register_bench_data()
    table = benches(args.smoke, args.epochs)
    plan = []
    for item in args.bench:
        name, _, variants = item.partition(":")
        for n in (list(table) if name == "all" else [name]):
            if n not in table:
                p.error(f"unknown benchmark {n!r}: choose from {', '.join(table)} or all")
            if name == "all" and n in ("resnet18", "gpt2") and torch.device(args.device).type != "cuda" and not args.smoke:
                continue  # GPU-sized: on a CPU only when named
            for v in (variants or args.variants).split(","):
                if v not in VARIANTS:
                    p.error(f"unknown variant {v!r}: choose from {', '.join(VARIANTS)}")
                plan.append((n, v))
    rows: list[dict] = []
    from litlab.errors import UserError

    for n, v in plan:
        try:
            rows.append(measure(table[n], args, v))
        except UserError as e:  # e.g. a --set override the config does not have
            p.error(f"{n} ({v}): {e}")
        write_outputs(args.out, rows, None)
    startup = startup_time(args) if args.startup else None
    print(write_outputs(args.out, rows, startup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
