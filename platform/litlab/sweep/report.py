"""The end of a sweep: best-trials table, the command reproducing a trial, Optuna plots as artifacts.

- `best_trials_table(study, metrics, top)`: a rich Table of the top-k COMPLETE trials (single
  objective, in the study's direction) or of the Pareto front (multi-objective); state counts in
  the caption.
- `reproduce_command(experiment, fixed, params)`: `litlab run <experiment> <overrides...>`, shell-quoted.
- `study_summary(study)`: plain, JSON-serialisable dict (counts, best value(s)/params) for `--show`.
- `log_study_plots(client, run_id, study, metric_names)`: optimization history, param importances,
  parallel coordinates (per objective) and the Pareto front, as HTML (plotly) and PNG (matplotlib)
  under `plots/` of the sweep's parent run. A plot that cannot be made is skipped with a reason
  (log line + `plots/skipped.txt`), never an exception.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from litlab.durations import fmt_duration

log = logging.getLogger(__name__)

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
PLOTS_DIR = "plots"


# Tables and summaries ---------------------------------------------------------------------------
def state_counts(study) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def objective_names(study, metrics: list[str] | None) -> list[str]:
    """One name per objective: the given metric names, `objective_<i>` where they run short."""
    metrics = list(metrics or [])
    n = len(study.directions)
    return [metrics[i] if i < len(metrics) else ("value" if n == 1 else f"objective_{i}") for i in range(n)]


def _is_multi(study) -> bool:
    return len(study.directions) > 1


def _sort_key(study):
    """Best first along the first objective (direction-aware), trial number breaking ties."""
    sign = 1 if study.directions[0].name == "MINIMIZE" else -1
    return lambda t: (sign * t.values[0], t.number)


def shown_trials(study, top: int = 5) -> list:
    """The trials a report shows: top-k COMPLETE (single objective) or the Pareto front."""
    from optuna.trial import TrialState

    if _is_multi(study):
        front = study.best_trials  # every Pareto-optimal COMPLETE trial; may be more than `top`
        return sorted(front, key=_sort_key(study))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=_sort_key(study))[:top]


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def counts_line(counts: dict[str, int]) -> str:
    n = sum(counts.values())
    return f"{n} trial{'' if n == 1 else 's'}: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATES)


def best_trials_table(study, metrics: list[str], top: int = 5) -> Table:
    """Columns: trial, one per objective (named by `metrics`), state, duration, one per param."""
    names = objective_names(study, metrics)
    trials = shown_trials(study, top)
    counts = state_counts(study)
    directions = ", ".join(f"{d.name.lower()} {n}" for d, n in zip(study.directions, names))
    if _is_multi(study):
        title = f"{study.study_name}: Pareto front, {len(trials)} trials ({directions})"
    else:
        title = f"{study.study_name}: best {len(trials)} of {counts['COMPLETE']} complete trials ({directions})"
    table = Table(title=title, caption=counts_line(counts))
    table.add_column("trial", justify="right")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("state")
    table.add_column("duration", justify="right")
    # Union of the shown trials' params: conditional spaces leave a trial without some of them.
    params = sorted({k for t in trials for k in t.params})
    for p in params:
        table.add_column(p, justify="right")
    for t in trials:
        table.add_row(str(t.number), *(fmt_value(v) for v in t.values), t.state.name, fmt_duration(t.duration.total_seconds() if t.duration else None),
                      *(fmt_value(t.params[p]) if p in t.params else "" for p in params))
    return table


def reproduce_command(experiment_path: str, fixed_overrides: list[str], params_overrides: list[str]) -> str:
    """`litlab run EXPERIMENT FIXED... PARAMS...`: the trial's params come last so they win over a
    fixed override of the same key. shlex.quote leaves safe tokens (a=b, a.b=0.01) bare and quotes
    the rest, e.g. 'model.hidden=[128, 64]'; shlex.split gives back the exact argv."""
    argv = ["litlab", "run", str(experiment_path), *fixed_overrides, *params_overrides]
    return " ".join(shlex.quote(tok) for tok in argv)


def shown_path(path: str | os.PathLike) -> str:
    """`path` relative to the working directory when it lies inside it, else absolute (a command to
    copy reads better as /data/e.yaml than as ../../data/e.yaml)."""
    relative = os.path.relpath(path)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return os.path.abspath(path)
    return relative


def study_summary(study) -> dict[str, Any]:
    """{study_name, directions, metric-free counts and bests}; best_* are None before any COMPLETE
    trial. best_trials is the Pareto front (multi-objective) or [the best trial]."""
    try:
        best = sorted(study.best_trials, key=_sort_key(study))
    except ValueError:  # no COMPLETE trial yet
        best = []
    single = not _is_multi(study)
    return {
        "study_name": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "n_trials": len(study.get_trials(deepcopy=False)),
        "states": state_counts(study),
        "best_trial": best[0].number if single and best else None,
        "best_value": float(best[0].value) if single and best else None,
        "best_params": dict(best[0].params) if single and best else None,
        "best_trials": [{"number": t.number, "values": [float(v) for v in t.values], "params": dict(t.params)}
                        for t in best],
    }


# Plots ------------------------------------------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "objective"


def _plot_plan(study, names: list[str]) -> list[tuple[str, str | None, Callable | None, Callable | None, str]]:
    """[(file stem, skip reason or None, plotly fn, matplotlib fn, label)], kwargs bound."""
    import optuna.visualization as V
    import optuna.visualization.matplotlib as M
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    # Importances use the params every COMPLETE trial has (Optuna's intersection search space).
    common = set.intersection(*(set(t.distributions) for t in complete)) if complete else set()
    every = {k for t in complete for k in t.distributions}
    nothing = "no COMPLETE trial yet" if not complete else None
    if nothing:
        imp_skip = nothing
    elif len(complete) < 2:
        imp_skip = f"needs >= 2 COMPLETE trials (has {len(complete)})"
    elif len(common) < 2:
        imp_skip = f"{len(common)} parameter(s) common to all COMPLETE trials: no ranking to show"
    else:
        imp_skip = None
    par_skip = nothing or (None if every else "the search space has no parameters")

    multi = len(names) > 1
    plan = []
    for i, name in enumerate(names):
        # Multi-objective plots need a scalar target: objective i. Single: the default (value).
        kw: dict[str, Any] = {"target_name": name}
        if multi:
            kw["target"] = lambda t, i=i: t.values[i]
        sfx = f"_{_slug(name)}" if multi else ""

        def imp(mod, kw=kw):  # a fresh seeded evaluator per call: HTML and PNG agree
            return lambda: mod.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), **kw)

        plan += [
            (f"optimization_history{sfx}", nothing, lambda kw=kw: V.plot_optimization_history(study, **kw),
             lambda kw=kw: M.plot_optimization_history(study, **kw), name),
            (f"param_importances{sfx}", imp_skip, imp(V), imp(M), name),
            (f"parallel_coordinate{sfx}", par_skip, lambda kw=kw: V.plot_parallel_coordinate(study, **kw),
             lambda kw=kw: M.plot_parallel_coordinate(study, **kw), name),
        ]
    if multi:
        skip = nothing or (None if len(names) <= 3 else f"{len(names)} objectives: Optuna draws 2 or 3")
        plan.append(("pareto_front", skip, lambda: V.plot_pareto_front(study, target_names=names),
                     lambda: M.plot_pareto_front(study, target_names=names), " vs ".join(names)))
    return plan


def _save_html(fig, path: Path, label: str) -> None:
    title = fig.layout.title.text or ""
    fig.update_layout(title_text=f"{title}: {label}" if title else label)
    # The plotly.js bundle from the CDN, as mlflow.log_figure does: ~10 kB a file instead of ~4.5 MB.
    fig.write_html(str(path), include_plotlyjs="cdn", full_html=True)


def _save_png(obj, path: Path, label: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    fig = obj if isinstance(obj, Figure) else obj.figure
    ax = obj.axes[0] if isinstance(obj, Figure) else obj
    for loc in ("center", "left"):  # Optuna titles some plots on the left
        if ax.get_title(loc):
            ax.set_title(f"{ax.get_title(loc)}: {label}", loc=loc)
    fig.set_size_inches(10, 6)
    # bbox tight: Optuna's default 6.4x4.8 layout clips long (dotted) param names and tick labels.
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def log_study_plots(client, parent_run_id: str, study, metric_names: list[str]) -> list[str]:
    """Log the study's plots to `plots/` of the parent run; return the artifact paths logged.
    Each plot that cannot be made is skipped with a reason (logged, and listed in plots/skipped.txt)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import optuna
    from optuna.exceptions import ExperimentalWarning

    names = objective_names(study, metric_names)
    logged: list[str] = []
    skipped: list[str] = []
    verbosity = optuna.logging.get_verbosity()
    with tempfile.TemporaryDirectory(prefix="litlab-plots-") as tmp, warnings.catch_warnings():
        # The matplotlib backend is "experimental" in Optuna: one warning per call, nothing to act on;
        # matplotlib warns on degenerate axes (one trial, one value): the plot is still right.
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            for stem, reason, make_html, make_png, label in _plot_plan(study, names):
                if reason:
                    skipped.append(f"{stem}: {reason}")
                    continue
                for ext, make, save in (("html", make_html, _save_html), ("png", make_png, _save_png)):
                    path = Path(tmp) / f"{stem}.{ext}"
                    try:
                        save(make(), path, label)
                        client.log_artifact(parent_run_id, str(path), PLOTS_DIR)
                    except Exception as e:  # a plot is a nicety: never fail the sweep's report
                        skipped.append(f"{stem}.{ext}: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    logged.append(f"{PLOTS_DIR}/{path.name}")
            if skipped:
                for line in skipped:
                    log.warning("sweep plot skipped: %s", line)
                try:
                    client.log_text(parent_run_id, "\n".join(skipped) + "\n", f"{PLOTS_DIR}/skipped.txt")
                    logged.append(f"{PLOTS_DIR}/skipped.txt")
                except Exception as e:
                    log.warning("could not log %s/skipped.txt: %s", PLOTS_DIR, e)
        finally:
            optuna.logging.set_verbosity(verbosity)
    return logged
