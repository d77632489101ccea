"""`litlab runs`: a table of tracked runs, newest first, with filters.

    litlab runs --model mlp --status FINISHED --where "test/acc>0.9" --sort test/acc

Filters become one MLflow search filter (so `--limit` counts matching runs): `--model` (tag
litlab.model), `--status`, and `--where METRIC OP NUMBER` (OP one of > >= < <= ==; repeatable, all
must hold), parsed by a regular expression, never evaluated. `--sort METRIC` orders by that metric,
highest first (`--asc`: lowest first); runs without it come last.
"""

from __future__ import annotations

import difflib
import re
import time
from dataclasses import dataclass

from litlab.durations import fmt_duration
from litlab.errors import UserError
from litlab.metric_names import logged_list

STATUSES = ("FINISHED", "FAILED", "RUNNING", "KILLED", "SCHEDULED")
METRIC_NAME = r"[A-Za-z_][A-Za-z0-9_./:\-]*"  # no quotes or backticks: safe inside a filter
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
WHERE = re.compile(rf"^\s*(?P<metric>{METRIC_NAME})\s*(?P<op>>=|<=|==|>|<)\s*(?P<value>{NUMBER})\s*$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str  # > >= < <= ==
    value: float

    def to_filter(self) -> str:
        return f"metrics.`{self.metric}` {'=' if self.op == '==' else self.op} {self.value!r}"


def parse_where(text: str) -> Condition:
    """'test/acc>0.9' -> Condition('test/acc', '>', 0.9); anything else is a UserError."""
    m = WHERE.match(text)
    if not m:
        raise UserError(f"--where {text!r}: expected METRIC OP NUMBER with OP one of > >= < <= ==, "
                        "e.g. --where 'test/acc>0.9'")
    return Condition(m["metric"], m["op"], float(m["value"]))


def key_metrics(run, also: list[str] | tuple = ()) -> dict[str, float]:
    """The monitored metric (its best value, then its last) and the test metrics, the numbers users
    compare first (+ `also`)."""
    m = run.data.metrics
    monitor = run.data.tags.get("litlab.monitor", "")
    keys = [f"best/{monitor}", monitor] + sorted(k for k in m if k.startswith("test/")) + list(also)
    return {k: m[k] for k in dict.fromkeys(keys) if k in m}


def _experiment_ids(c, experiment: str | None) -> list[str]:
    if experiment:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(e.name for e in c.search_experiments()) or "(none yet)"
            raise UserError(f"--experiment: no experiment {experiment!r}; experiments: {names}")
        return [exp.experiment_id]
    return [e.experiment_id for e in c.search_experiments()]


def build_query(model: str | None = None, status: str | None = None, where: list[str] | None = None,
                sort: str | None = None, asc: bool = False) -> tuple[str, list[str], list[Condition]]:
    """(MLflow filter string, order_by, parsed conditions) of the command's options."""
    clauses = []
    if model is not None:
        if not MODEL_NAME.match(model):
            raise UserError(f"--model {model!r}: a model name has only letters, digits, _ . - (see `litlab models`)")
        clauses.append(f"tags.`litlab.model` = '{model}'")
    if status is not None:
        if status.upper() not in STATUSES:
            raise UserError(f"--status {status!r}: one of {', '.join(STATUSES[:4])}")
        clauses.append(f"attributes.status = '{status.upper()}'")
    conditions = [parse_where(w) for w in where or []]
    clauses += [c.to_filter() for c in conditions]
    order = []
    if sort is not None:
        if not re.fullmatch(METRIC_NAME, sort):
            raise UserError(f"--sort {sort!r}: not a metric name (e.g. --sort test/acc)")
        order.append(f"metrics.`{sort}` {'ASC' if asc else 'DESC'}")
    order.append("attributes.start_time DESC")
    return " and ".join(clauses), order, conditions


def fetch_runs(uri: str, experiment: str | None, limit: int, *, model: str | None = None,
               status: str | None = None, where: list[str] | None = None, sort: str | None = None,
               asc: bool = False):
    from litlab.tracking_store import client

    filter_string, order, conditions = build_query(model, status, where, sort, asc)
    c = client(uri)
    ids = _experiment_ids(c, experiment)
    if not ids:
        return []
    runs = list(c.search_runs(ids, filter_string=filter_string, order_by=order, max_results=limit))
    asked = [x.metric for x in conditions] + ([sort] if sort else [])
    missing = [m for m in asked if not any(m in r.data.metrics for r in runs)]
    if missing:  # a typo, or only no run matched? Look at what the store has logged.
        known = _logged_metrics(c, ids)
        for m in missing:
            if m not in known:
                flag = "--sort" if m == sort and m not in [x.metric for x in conditions] else "--where"
                close = difflib.get_close_matches(m, sorted(known), n=3)
                hint = f"; did you mean {' or '.join(close)}?" if close else (
                    f"; logged: {logged_list(known)}" if known else "")
                raise UserError(f"{flag}: no run logged a metric {m!r}{hint}")
    if model is not None and not runs:
        seen = _logged_models(c, ids)
        if model not in seen:
            raise UserError(f"--model: no run of model {model!r}; models in this store: {', '.join(sorted(seen)) or '(none)'}")
    return runs


def _logged_metrics(c, ids: list[str]) -> set[str]:
    return {k for r in c.search_runs(ids, max_results=500) for k in r.data.metrics}


def _logged_models(c, ids: list[str]) -> set[str]:
    return {r.data.tags["litlab.model"] for r in c.search_runs(ids, max_results=500) if "litlab.model" in r.data.tags}


def print_runs(tracking_uri: str | None, experiment: str | None, limit: int, *, model: str | None = None,
               status: str | None = None, where: list[str] | None = None, sort: str | None = None,
               asc: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    from litlab.tracking_store import resolve_tracking_uri

    if limit < 1:
        raise UserError("--limit: must be >= 1")
    uri = resolve_tracking_uri(tracking_uri)
    runs = fetch_runs(uri, experiment, limit, model=model, status=status, where=where, sort=sort, asc=asc)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=220)
    filtered = any(x is not None for x in (model, status, sort)) or bool(where)
    if not runs:
        console.print(f"no runs match in {uri}" if filtered else
                      f"no runs in {uri} yet: try `litlab run experiments/mlp/mlp_digits.yaml`", markup=False)
        return
    also = [parse_where(w).metric for w in where or []] + ([sort] if sort else [])
    title = f"runs in {uri}" + (f", by {sort} {'ascending' if asc else 'descending'}" if sort else "")
    table = Table(title=title, title_justify="left")
    for col in ("run id", "name", "model", "status", "start", "duration", "key metrics"):
        table.add_column(col, no_wrap=col in ("run id", "start"))
    colour = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow", "RUNNING": "cyan"}
    for r in runs:
        info = r.info
        start = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.start_time / 1000)) if info.start_time else "-"
        end = info.end_time or (int(time.time() * 1000) if info.status == "RUNNING" else None)
        duration = fmt_duration((end - info.start_time) / 1000 if end and info.start_time else None)
        metrics = "  ".join(f"{k}={v:.4g}" for k, v in key_metrics(r, also).items())
        table.add_row(info.run_id, info.run_name or "-", r.data.tags.get("litlab.model", "-"),
                      f"[{colour.get(info.status, 'white')}]{info.status}[/]", start, duration, metrics)
    console.print(table)
