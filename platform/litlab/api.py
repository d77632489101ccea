"""Notebook API: `litlab.run(...)` and `litlab.load(run_id)`."""

from __future__ import annotations

from pathlib import Path

from litlab.runner import RunResult


def run(experiment: str | Path | dict, overrides: list[str] | dict | None = None, *,
        tracking_uri: str | None = None) -> RunResult:
    """Train + test an experiment (YAML path or dict) with dotted overrides; returns the result
    (run_id, metrics, best_checkpoint, ...)."""
    from litlab import runner

    return runner.run(experiment, overrides, tracking_uri=tracking_uri)


def load(run_id: str, *, which: str = "best", tracking_uri: str | None = None):
    """The trained LightningModule of a run (its best checkpoint, or `which="last"`), in eval mode."""

    from litlab import registry, runner, tracking
    from litlab.checkpointing import META_KEY, find_last_checkpoint, load_checkpoint
    from litlab.errors import UserError

    uri = tracking.resolve_tracking_uri(tracking_uri)
    c = tracking.client(uri)
    run_info = c.get_run(run_id)
    ckpt_dir = run_info.data.tags.get("litlab.checkpoint_dir")
    path = None
    if which == "best":
        local = sorted(Path(ckpt_dir).glob("best-*.ckpt")) if ckpt_dir and Path(ckpt_dir).exists() else []
        if local:
            path = max(local, key=lambda p: p.stat().st_mtime)
        else:
            try:
                path = Path(c.download_artifacts(run_id, "checkpoints/best.ckpt"))
            except Exception:
                path = None
    if path is None:
        path = find_last_checkpoint(uri, run_id, ckpt_dir)
    if path is None:
        raise UserError(f"run {run_id} has no checkpoint to load")
    ckpt = load_checkpoint(path, trusted=True)  # the run's own checkpoint or artifact
    cfg = runner.load_config(ckpt[META_KEY]["config"])
    module = registry.get_model(cfg.model["name"]).cls(**{k: v for k, v in cfg.model.items() if k != "name"})
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
