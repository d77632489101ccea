"""`litlab runs`: a table of tracked runs, newest first."""

from __future__ import annotations

import time

from litlab.errors import UserError


def _fmt_duration(ms: int | None) -> str:
    if not ms:
        return "-"
    s = int(ms / 1000)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def key_metrics(run) -> dict[str, float]:
    """The monitored metric and the test metrics, the numbers users compare first."""
    m = run.data.metrics
    keys = [run.data.tags.get("litlab.monitor", "")] + sorted(k for k in m if k.startswith("test/"))
    return {k: m[k] for k in dict.fromkeys(keys) if k in m}


def fetch_runs(uri: str, experiment: str | None, limit: int):
    from litlab.tracking import client

    c = client(uri)
    if experiment:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(e.name for e in c.search_experiments()) or "(none yet)"
            raise UserError(f"--experiment: no experiment {experiment!r}; experiments: {names}")
        ids = [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in c.search_experiments()]
    if not ids:
        return []
    return c.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=limit)


def print_runs(tracking_uri: str | None, experiment: str | None, limit: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from litlab.tracking import resolve_tracking_uri

    if limit < 1:
        raise UserError("--limit: must be >= 1")
    uri = resolve_tracking_uri(tracking_uri)
    runs = fetch_runs(uri, experiment, limit)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=220)
    if not runs:
        console.print(f"no runs in {uri} yet: try `litlab run experiments/mlp/mlp_digits.yaml`")
        return
    table = Table(title=f"runs in {uri}", title_justify="left")
    for col in ("run id", "name", "model", "status", "start", "duration", "key metrics"):
        table.add_column(col, no_wrap=col in ("run id", "start"))
    colour = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow", "RUNNING": "cyan"}
    for r in runs:
        info = r.info
        start = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.start_time / 1000)) if info.start_time else "-"
        end = info.end_time or (int(time.time() * 1000) if info.status == "RUNNING" else None)
        duration = _fmt_duration(end - info.start_time if end and info.start_time else None)
        metrics = "  ".join(f"{k}={v:.4g}" for k, v in key_metrics(r).items())
        table.add_row(info.run_id, info.run_name or "-", r.data.tags.get("litlab.model", "-"),
                      f"[{colour.get(info.status, 'white')}]{info.status}[/]", start, duration, metrics)
    console.print(table)
