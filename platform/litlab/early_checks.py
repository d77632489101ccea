"""What litlab's commands check before the ~9 s import of Lightning, so that a user's mistake is one
line at once: the experiment file and its overrides, litlab's own sections (config.precheck), the
model's and data's names, argument names and values (model_index, read from the source). The full
checks with the classes come after the import, and say the same for what is checked here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litlab.errors import UserError


def check_experiment(source: str | Path | dict, overrides: list[str] | dict | None) -> dict[str, Any]:
    """`litlab run` (and every config a sweep will try): the raw config, checked; raises UserError."""
    from litlab import config, model_index

    raw = config.load_raw(source, overrides)
    config.precheck(raw)
    model_index.check_names_and_arguments(raw)
    return raw


def check_resume(run_id: str, overrides: list[str], tracking_uri: str | None) -> None:
    """`litlab resume`: the run (a wrong id told after MLflow's import, ~2 s) and the overrides
    against the config in its own last.ckpt (torch's import, ~2 s more); runner.resume checks
    everything again with the classes."""
    from litlab.tracking_store import find_run, resolve_tracking_uri

    run = find_run(resolve_tracking_uri(tracking_uri), run_id)
    refuse_sweep_parent(run_id, run.data.tags)
    own_dir = run.data.tags.get("litlab.checkpoint_dir")
    if not overrides or not own_dir:
        return
    from litlab.checkpoint_files import LAST, read_metadata

    last = Path(own_dir) / LAST
    if not last.is_file():  # only in the artifacts: runner.resume downloads it, then checks
        return
    meta = read_metadata(last, trusted=True)  # the run's own directory, as runner.resume trusts it
    if meta.get("run_id") == run_id and isinstance(meta.get("config"), dict):
        check_experiment(meta["config"], overrides)


def refuse_sweep_parent(run_id: str, tags: dict[str, str]) -> None:
    """A sweep's parent run holds its trials, not a training run with checkpoints to resume."""
    if tags.get("litlab.sweep") == "true":
        raise UserError(f"run {run_id} is the parent run of sweep {tags.get('optuna.study', '?')}, not a training "
                        f"run: continue the sweep by running `litlab sweep {tags.get('litlab.sweep_file', 'SWEEP.yaml')}`"
                        " again, or resume one of its trials")
