"""`litlab compare`: runs side by side, and one metric of several runs on one plot.

    litlab compare RUN_ID RUN_ID ...            the params that differ + key metrics, best marked
    litlab compare --experiment mlp_digits      the newest runs of an experiment (sweep parents left out)
    litlab compare A B --plot val/acc --out acc.png

Key metrics are those a user compares first: each run's monitored metric (tags litlab.monitor and
litlab.mode, which say whether higher or lower is better) and every test/* metric; `--metric`
adds others. The best value of each metric row is bold green on a terminal, marked `*` otherwise.
"""

from __future__ import annotations

import difflib
import math
import re

from litlab.errors import UserError

RUN_ID = re.compile(r"^[0-9a-f]{6,32}$")
# A test/* metric whose name says "error" of some kind is better low; any other is better high.
LOWER_IS_BETTER = re.compile(r"loss|err|mse|mae|rmse|nll|perplexity|ppl|bpd|bits|fid|distance|regret",
                             re.IGNORECASE)
# Params that differ between any two runs and say nothing about the experiment.
NOISE_PARAMS = {"tracking.run_name"}


# ------------------------------------------------------------------------------------ choosing runs
def find_runs(c, run_ids: list[str] | None, experiment: str | None, limit: int = 10,
              uri: str = "") -> list:
    """The runs to compare, in the order given (ids; a unique prefix of 6+ characters is enough)
    or newest first (--experiment, without the sweeps' parent runs)."""
    if bool(run_ids) == bool(experiment):
        raise UserError("give RUN_IDs or --experiment NAME (not both)")
    if experiment:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(e.name for e in c.search_experiments()) or "(none yet)"
            raise UserError(f"--experiment: no experiment {experiment!r} in {uri}; experiments: {names}")
        runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit + 50)
        runs = [r for r in runs if r.data.tags.get("litlab.sweep") != "true"][:limit]
        if not runs:
            raise UserError(f"--experiment: experiment {experiment!r} has no runs yet")
        return runs
    runs, seen = [], set()
    everything = None
    for rid in run_ids:
        if not RUN_ID.match(rid):
            raise UserError(f"{rid!r} is not a run id (32 hex characters, or a unique prefix of 6+; "
                            "list them with `litlab runs`)")
        if len(rid) < 32:
            if everything is None:
                ids = [e.experiment_id for e in c.search_experiments()]
                everything = c.search_runs(ids, max_results=5000) if ids else []
            hits = [r for r in everything if r.info.run_id.startswith(rid)]
            if not hits:
                raise UserError(f"no run whose id starts with {rid!r} in {uri} (list them with `litlab runs`)")
            if len(hits) > 1:
                raise UserError(f"run id prefix {rid!r} matches {len(hits)} runs in {uri}; give more characters")
            run = hits[0]
        else:
            run = _get_run(c, rid, uri)
        if run.info.run_id not in seen:
            seen.add(run.info.run_id)
            runs.append(run)
    return runs


def _get_run(c, run_id: str, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run {run_id} in {uri} (list them with `litlab runs`)") from None


# ------------------------------------------------------------------------------------ the table
def differing_params(runs) -> dict[str, list[str]]:
    """param -> value per run ('-' where a run lacks it), for params that are not all equal."""
    keys = sorted(set().union(*(r.data.params for r in runs)) - NOISE_PARAMS)
    out = {}
    for k in keys:
        values = [r.data.params.get(k, "-") for r in runs]
        if len(set(values)) > 1:
            out[k] = values
    return out


def metric_direction(runs, metric: str) -> str:
    """'max' or 'min': a run's litlab.mode when the metric is what it monitored, else by name."""
    monitored = metric.removeprefix("best/")  # best/<monitor>: the monitored metric's best value
    for r in runs:
        if r.data.tags.get("litlab.monitor") == monitored and r.data.tags.get("litlab.mode") in ("min", "max"):
            return r.data.tags["litlab.mode"]
    name = metric.rpartition("/")[2]
    return "max" if name.startswith("acc") or not LOWER_IS_BETTER.search(name) else "min"


def key_metric_names(runs, extra: list[str] | None = None) -> list[str]:
    monitored = [r.data.tags["litlab.monitor"] for r in runs if r.data.tags.get("litlab.monitor")]
    monitors = [name for m in monitored for name in (f"best/{m}", m)]  # its best value, then its last
    tests = sorted({k for r in runs for k in r.data.metrics if k.startswith("test/")})
    names = [m for m in dict.fromkeys([*monitors, *tests, *(extra or [])]) if m]
    have = {k for r in runs for k in r.data.metrics}
    for m in extra or []:
        if m not in have:
            raise UserError(f"--metric: no run here logged {m!r}{_did_you_mean(m, have)}")
    return [m for m in names if m in have]


def best_index(values: list[float | None], direction: str) -> set[int]:
    """Indices of the best finite value(s) (ties all count)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return set()
    best = max(finite) if direction == "max" else min(finite)
    return {i for i, v in enumerate(values) if v == best}


def comparison(runs, extra_metrics: list[str] | None = None) -> dict:
    """Plain data behind the table: run labels, differing params, metric rows with best marks."""
    metrics = []
    for m in key_metric_names(runs, extra_metrics):
        values = [r.data.metrics.get(m) for r in runs]
        direction = metric_direction(runs, m)
        metrics.append({"name": m, "direction": direction, "values": values, "best": best_index(values, direction)})
    return {"runs": [(r.info.run_id, r.info.run_name or "-", r.info.status) for r in runs],
            "params": differing_params(runs), "metrics": metrics}


def render(data: dict, console) -> None:
    from rich.table import Table

    fancy = console.is_terminal
    table = Table(title="runs compared" + ("" if fancy else "   (* = best of the row)"), title_justify="left")
    table.add_column("", style="bold" if fancy else None)
    for run_id, name, status in data["runs"]:
        table.add_column(f"{name}\n{run_id[:8]}" + ("" if status == "FINISHED" else f" {status}"), justify="right")
    if data["params"]:
        table.add_row("[dim]params that differ[/]" if fancy else "params that differ")
        for k, values in data["params"].items():
            table.add_row(k, *(_shorten(v) for v in values))
    elif len(data["runs"]) > 1:
        table.add_row("(params all equal)")
    table.add_section()
    table.add_row("[dim]metrics[/]" if fancy else "metrics")
    for row in data["metrics"]:
        cells = []
        for i, v in enumerate(row["values"]):
            text = "-" if v is None else f"{v:.4g}"
            if i in row["best"]:
                text = f"[bold green]{text}[/]" if fancy else f"{text} *"
            cells.append(text)
        arrow = "↑" if row["direction"] == "max" else "↓"
        table.add_row(f"{row['name']} {arrow}" if fancy else f"{row['name']} ({row['direction']})", *cells)
    console.print(table)


def _shorten(v: str, n: int = 40) -> str:
    from rich.markup import escape

    return escape(v if len(v) <= n else v[: n - 1] + "…")


# ------------------------------------------------------------------------------------ the plot
def metric_figure(c, runs, metric: str):
    """One metric over steps for each run, overlaid, one line per run (label: name and short id)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    have = {k for r in runs for k in r.data.metrics}
    if metric not in have:
        raise UserError(f"--plot: no run here logged {metric!r}{_did_you_mean(metric, have)}")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        hist = sorted(c.get_metric_history(r.info.run_id, metric), key=lambda m: (m.step, m.timestamp))
        if not hist:
            continue
        label = f"{r.info.run_name or '-'} ({r.info.run_id[:8]})"
        ax.plot([m.step for m in hist], [m.value for m in hist], marker="o" if len(hist) < 30 else None,
                markersize=3, label=label)
    direction = metric_direction(runs, metric)
    ax.set_title(f"{metric} over training ({'higher' if direction == 'max' else 'lower'} is better)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_path(out: str) -> str:
    """The file --plot writes for `--out out`: a name without an extension gets .png (as matplotlib
    would add it: the path printed is the one written); a format matplotlib cannot write, or a
    directory, is a UserError."""
    import os

    from matplotlib.backend_bases import FigureCanvasBase

    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        raise UserError(f"--out: {out} is a directory; give a file name, e.g. {os.path.join(out, 'plot.png')}")
    ext = os.path.splitext(out)[1][1:].lower()
    if not ext:
        return out.rstrip(".") + ".png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        raise UserError(f"--out {out}: cannot write a .{ext} file; give a name ending in one of "
                        f"{', '.join('.' + f for f in sorted(formats))}")
    return out


def plot_metric(c, runs, metric: str, out: str) -> str:
    """metric_figure() written to `out` (PNG unless its extension names another format); returns the
    path written."""
    import matplotlib.pyplot as plt

    out = plot_path(out)
    fig = metric_figure(c, runs, metric)
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise UserError(f"--out: cannot write {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return out


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, sorted(choices), n=3)
    if close:
        return f"; did you mean {' or '.join(close)}?"
    from litlab.metric_names import logged_list

    return f"; logged: {logged_list(choices)}" if choices else ""


# ------------------------------------------------------------------------------------ command
def compare(run_ids: list[str] | None, experiment: str | None, tracking_uri: str | None = None, *,
            metrics: list[str] | None = None, plot: str | None = None, out: str | None = None,
            limit: int = 10, console=None) -> dict:
    from rich.console import Console

    from litlab.tracking_store import client, resolve_tracking_uri

    if limit < 1:
        raise UserError("--limit: must be >= 1")
    if out and not plot:
        raise UserError("--out: only with --plot METRIC")
    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    runs = find_runs(c, run_ids, experiment, limit, uri)
    data = comparison(runs, metrics)
    if plot:  # check the metric before printing anything
        out = plot_metric(c, runs, plot, out or f"compare_{re.sub(r'[^A-Za-z0-9_.-]+', '_', plot)}.png")
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped: no 80-column squeeze
            console = Console(width=200)
    render(data, console)
    if plot:
        console.print(f"plot of {plot} for {len(runs)} runs: {out}", markup=False)
    return data
