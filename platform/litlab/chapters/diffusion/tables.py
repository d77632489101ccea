"""Sample quality against sampler settings, as in Table 1 of the DDIM paper (Song et al. 2021):

* steps table: for each sampler (ddim = DDIM eta=0; ddpm = ancestral with beta_tilde on the respaced
  schedule, which equals DDIM eta=1; ddpm_beta = ancestral with beta, the paper's sigma-hat) and each
  number of sampling steps S: Frechet distance to the real test digits and mean classifier confidence
  of `n` EMA samples from the same seed, and the seconds it took;
* guidance table (conditional models): class accuracy, FID and confidence against the guidance scale w,
  plus the null class (unconditional) as the chance reference.

`log_quality_tables(module)` computes them and stores quality/steps.{md,csv,png} (and
quality/guidance.{md,csv,png}) with the run; benchmarks/diffusion_steps.py prints the same for a checkpoint.
"""

from __future__ import annotations

import time

SAMPLER_NAMES = {"ddim": "DDIM (eta=0)", "ddpm": "DDPM (beta_tilde; = DDIM eta=1)", "ddpm_beta": "DDPM (beta)"}


def steps_table(module, samplers, steps_list, n: int, seed: int = 0) -> list[dict]:
    from litlab import quality

    T = module.hparams.timesteps
    rows = []
    for kind in samplers:
        for steps in sorted({s for s in steps_list if s <= T}):
            start = time.perf_counter()
            images = module.generate(n, module.default_labels(n), seed=seed, sampler=kind, steps=steps)
            seconds = time.perf_counter() - start
            rows.append({"sampler": kind, "steps": steps, "fid": quality.frechet_distance(images),
                         "confidence": quality.confidence(images), "seconds": seconds})
    return rows


def guidance_table(module, scales, n: int, seed: int = 0) -> list[dict]:
    from litlab import quality

    labels = module.default_labels(n)
    rows = []
    for w in [None, *scales]:  # None: the null class, i.e. the unconditional model
        images = module.generate(n, None if w is None else labels, seed=seed, guidance=w)
        rows.append({"guidance": "uncond" if w is None else w,
                     "class_accuracy": quality.class_accuracy(images, labels),
                     "fid": quality.frechet_distance(images), "confidence": quality.confidence(images)})
    return rows


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def to_markdown(rows: list[dict], title: str = "") -> str:
    cols = list(rows[0])
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    cols = list(rows[0])
    return "\n".join([",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]) + "\n"


def plot_steps(rows: list[dict], title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="tight")
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(axes, ("fid", "confidence"), ("Frechet distance (lower is better)",
                                                            "classifier confidence (0.1 = chance)")):
        for kind in dict.fromkeys(r["sampler"] for r in rows):
            pts = [(r["steps"], r[key]) for r in rows if r["sampler"] == kind]
            ax.plot(*zip(*pts), marker="o", label=SAMPLER_NAMES.get(kind, kind))
        ax.set(xscale="log", xlabel="sampling steps S", ylabel=label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_guidance(rows: list[dict], title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="tight")
    axes = fig.subplots(1, 2)
    guided = [r for r in rows if r["guidance"] != "uncond"]
    ws = [r["guidance"] for r in guided]
    axes[0].plot(ws, [r["class_accuracy"] for r in guided], marker="o", label="conditional, guidance w")
    axes[0].axhline(0.1, color="gray", ls=":", label="chance")
    axes[0].set(xlabel="guidance scale w", ylabel="class accuracy", ylim=(0, 1.02))
    axes[1].plot(ws, [r["fid"] for r in guided], marker="o")
    axes[1].set(xlabel="guidance scale w", ylabel="Frechet distance")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def log_quality_tables(module, quick: bool = False) -> dict[str, list[dict]]:
    """Compute the tables for `module` (a trained DDPM) and store them with the run; `quick` (a
    fast_dev_run) shrinks them to a couple of cheap settings."""
    from litlab.module import log_text

    h = module.hparams
    n = 20 if quick else module.num_eval_samples
    steps = [2, min(5, h.timesteps)] if quick else list(h.table_steps)
    out = {}
    rows = steps_table(module, h.table_samplers, steps, n, seed=h.sample_seed)
    title = f"{n} samples, T={h.timesteps} ({h.schedule}), EMA weights" + (
        f", guidance w={h.guidance_scale}" if module.conditional else "")
    out["steps"] = rows
    log_text(module, to_markdown(rows, f"Sample quality vs sampling steps: {title}"), "quality/steps.md")
    log_text(module, to_csv(rows), "quality/steps.csv")
    if module._can_log_files():
        module.log_figure(plot_steps(rows, title), "quality/steps.png")
    if module.conditional:
        scales = [0.0, max(h.table_guidance)] if quick else list(h.table_guidance)
        g_rows = guidance_table(module, scales, n, seed=h.sample_seed)
        out["guidance"] = g_rows
        what = f"{n} samples (classes 0-9 in turn), {module.make_sampler()}"
        log_text(module, to_markdown(g_rows, f"Classifier-free guidance: {what}"), "quality/guidance.md")
        log_text(module, to_csv(g_rows), "quality/guidance.csv")
        if module._can_log_files():
            module.log_figure(plot_guidance(g_rows, what), "quality/guidance.png")
    return out
