"""Time and peak memory of forward + backward for every attention backend over sequence lengths,
written as a markdown table and a PNG plot (log-log: exact attention grows as n^2, the others as n).

    PYTHONPATH=platform python benchmarks/attention_backends.py --device cpu --lengths 256 512 1024 2048 4096 --out /tmp/bench
    PYTHONPATH=platform python benchmarks/attention_backends.py --device cuda --lengths 1024 4096 16384 --out /tmp/bench

One call of litlab.chapters.transformer.attention.attend on q, k, v of shape (batch, heads, n,
head_dim) with requires_grad, then out.sum().backward(); the time is the median of --repeats runs
after one warm-up. Peak memory: on CUDA torch.cuda.max_memory_allocated() above what was allocated
before the call; on CPU each (backend, length) runs in a forked child process and the peak is its
maximum resident set size (getrusage) above its resident size just before the call (after a
tiny warm-up call) -- a coarse
measure (allocator caching, page granularity) but it shows n^2 against n.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import torch  # noqa: E402

from litlab.chapters.transformer import performer, sparse  # noqa: E402,F401  (imported before forking)
from litlab.chapters.transformer.attention import BACKENDS, attend  # noqa: E402


def backend_options(backend: str, args) -> dict:
    return {
        "performer": {"num_features": args.features, "chunk_size": args.chunk},
        "sliding_window": {"window": args.window, "global_tokens": args.global_tokens},
        "bigbird": {"block_size": args.block, "num_global_blocks": 1, "num_random_blocks": args.random_blocks},
    }.get(backend, {})


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(backend: str, n: int, causal: bool, args) -> dict:
    """{'ms': median forward+backward time, 'mib': peak extra memory} for one configuration."""
    device = torch.device(args.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.heads, n, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device).requires_grad_() for _ in range(3))
    opts = backend_options(backend, args)

    def step():
        for t in (q, k, v):
            t.grad = None
        attend(q, k, v, backend=backend, causal=causal, **opts).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:  # first a tiny call, so that one-time initialisations are not counted as the peak
        tiny = [torch.randn(1, 1, 16, args.head_dim, requires_grad=True) for _ in range(3)]
        attend(*tiny, backend=backend, causal=causal, **opts).sum().backward()
        base = _rss_bytes()
        step()  # KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"ms": 1000 * statistics.median(times), "mib": max(peak, 0) / 2**20}


def _child(conn, backend, n, causal, args):
    torch.set_num_threads(args.threads)
    try:
        conn.send(measure(backend, n, causal, args))
    except (RuntimeError, MemoryError) as e:  # out of memory, or a backend refusing the size
        conn.send({"error": str(e).splitlines()[0][:80]})
    conn.close()


def run_one(backend, n, causal, args) -> dict:
    if args.device == "cuda":  # no fork with CUDA; in-process is exact with max_memory_allocated
        try:
            return measure(backend, n, causal, args)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {"error": "out of memory"}
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, backend, n, causal, args))
    proc.start()
    child.close()
    result = parent.recv() if parent.poll(args.timeout) else {"error": f"timeout {args.timeout}s"}
    proc.join(5)
    if proc.is_alive():
        proc.kill()
    return result


def markdown(results: dict, args) -> str:
    lines = [f"Forward + backward of one attention call, batch {args.batch}, {args.heads} heads, head_dim "
             f"{args.head_dim}, device {args.device} ({torch.get_num_threads() if args.device == 'cpu' else 1} "
             f"thread(s) on CPU); time in ms (median of {args.repeats}), peak extra memory in MiB.", "",
             "| backend | mode | " + " | ".join(f"n={n}" for n in args.lengths) + " |",
             "|---|---|" + "---|" * len(args.lengths)]
    for (backend, mode), row in results.items():
        cells = []
        for n in args.lengths:
            r = row[n]
            cells.append(r["error"] if "error" in r else f"{r['ms']:.1f} ms / {r['mib']:.0f} MiB")
        lines.append(f"| {backend} | {mode} | " + " | ".join(cells) + " |")
    opts = "; ".join(f"{b}: {backend_options(b, args)}" for b in args.backends if backend_options(b, args))
    return "\n".join(lines + ["", f"Options: {opts}."]) + "\n"


def plot(results: dict, args, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for (backend, mode), row in results.items():
        ns = [n for n in args.lengths if "error" not in row[n]]
        style = "-" if mode == "bidirectional" else "--"
        color = f"C{args.backends.index(backend)}"
        ax_t.plot(ns, [row[n]["ms"] for n in ns], style, marker="o", color=color, label=f"{backend} ({mode})")
        ax_m.plot(ns, [max(row[n]["mib"], 0.1) for n in ns], style, marker="o", color=color)
    for ax, label in ((ax_t, "forward + backward time (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length n", ylabel=label)
        ax.set_xticks(args.lengths, [str(n) for n in args.lengths])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(f"attention backends on {args.device}: batch {args.batch}, {args.heads} heads, "
                 f"head_dim {args.head_dim}")
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--out", default="benchmark_out", help="directory for attention_backends.md / .png")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--modes", nargs="+", choices=["bidirectional", "causal"], default=["bidirectional", "causal"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]))
    p.add_argument("--timeout", type=float, default=300, help="seconds per configuration (CPU)")
    p.add_argument("--features", type=int, default=256, help="performer random features")
    p.add_argument("--chunk", type=int, default=128, help="performer causal chunk size")
    p.add_argument("--window", type=int, default=128, help="sliding_window one-sided window")
    p.add_argument("--global-tokens", type=int, default=1, help="sliding_window global tokens")
    p.add_argument("--block", type=int, default=64, help="bigbird block size")
    p.add_argument("--random-blocks", type=int, default=3, help="bigbird random blocks per query block")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for mode in args.modes:
        for backend in args.backends:
            row = results.setdefault((backend, mode), {})
            for n in args.lengths:
                row[n] = run_one(backend, n, mode == "causal", args)
                r = row[n]
                print(f"{backend:>15} {mode:>13} n={n:>6}: "
                      + (r["error"] if "error" in r else f"{r['ms']:9.1f} ms {r['mib']:8.1f} MiB"), flush=True)
    table = markdown(results, args)
    (out / "attention_backends.md").write_text(table)
    plot(results, args, out / "attention_backends.png")
    print("\n" + table + f"\nwrote {out / 'attention_backends.md'} and {out / 'attention_backends.png'}")


if __name__ == "__main__":
    main()
