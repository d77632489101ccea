"""Sample quality against sampling steps (DDPM vs DDIM, Table 1 of the DDIM paper) and against the
classifier-free guidance scale, for a trained `ddpm` checkpoint, printed as markdown tables.

    # a checkpoint of a run (e.g. mlruns/checkpoints/<run_id>/best-*.ckpt)
    PYTHONPATH=platform python benchmarks/diffusion_steps.py --checkpoint path/to/best.ckpt
    # or train an experiment first (not tracked), then measure its best checkpoint
    PYTHONPATH=platform python benchmarks/diffusion_steps.py --config experiments/diffusion/ddim_digits.yaml

Every row: the same `--samples` initial noises (seed 0), EMA weights; Frechet distance to the 270 real
test digits and mean confidence of the digits classifier (litlab.quality); seconds on this machine.
The same tables are stored with a run whose YAML sets model.quality_table: true.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import torch  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a ddpm checkpoint (.ckpt)")
    src.add_argument("--config", help="an experiment YAML to train first (tracking off)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for --config, e.g. trainer.max_epochs=50")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100, 1000])
    p.add_argument("--samplers", nargs="+", default=["ddim", "ddpm"], choices=["ddim", "ddpm", "ddpm_beta"])
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0],
                   help="guidance scales (conditional models only)")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1] while sampling")
    p.add_argument("--csv", help="also write the steps table as CSV here")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    from litlab.chapters.diffusion import tables
    from litlab.chapters.diffusion.module import DDPM

    ckpt = args.checkpoint
    if args.config:
        from litlab import runner

        start = time.perf_counter()
        res = runner.run(args.config, ["tracking.mlflow=false", "model.quality_table=false", *args.overrides],
                         quiet=True)
        print(f"trained {args.config} in {time.perf_counter() - start:.0f} s; test metrics: "
              + ", ".join(f"{k}={v:.3f}" for k, v in sorted(res.metrics.items())))
        ckpt = res.best_checkpoint
    model = DDPM.load_from_checkpoint(ckpt, map_location="cpu")  # restores the EMA (on_load_checkpoint)
    model.eval()
    h = model.hparams
    if args.no_clip:
        h.clip_x0 = False
    print(f"\n{ckpt}: T={h.timesteps} ({h.schedule}), base_channels={h.base_channels}, "
          f"conditional={h.conditional}, clip_x0={h.clip_x0}, EMA updates={model.ema.num_updates}\n")
    rows = tables.steps_table(model, args.samplers, args.steps, args.samples)
    print(tables.to_markdown(rows, f"Sample quality vs sampling steps ({args.samples} samples)"))
    if args.csv:
        Path(args.csv).write_text(tables.to_csv(rows))
    if model.conditional:
        g_rows = tables.guidance_table(model, args.guidance, args.samples)
        print(tables.to_markdown(g_rows, f"Classifier-free guidance, {model.make_sampler()}"))


if __name__ == "__main__":
    main()
