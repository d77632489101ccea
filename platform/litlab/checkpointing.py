"""Checkpoints that know their run: atomic writes, run metadata, and finding the one to resume.

Every checkpoint holds `checkpoint["litlab"] = {"run_id", "config_hash", "config", ...}`; that is
how `litlab resume RUN_ID` re-attaches to the same MLflow run and refuses a checkpoint that belongs
to another run or another model. Files are written to a temporary name and renamed, so a kill in
the middle of a save never leaves a corrupt `last.ckpt`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from litlab import __version__
from litlab.checkpoint_files import (  # noqa: F401  (re-exported: reading checkpoints needs no Lightning)
    ALLOW_EXTERNAL_ENV,
    LAST,
    META_KEY,
    is_litlab_path,
    load_checkpoint,
    read_metadata,
    read_resume_point,
)
from litlab.errors import UserError
from litlab.monitor_check import BestCheckpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `<path>.tmp`, fsync, then os.replace: the old file stays valid until the new
    one is complete."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class RunMetadata(Callback):
    """Writes the run id, config hash and resolved config into every checkpoint."""

    def __init__(self, run_id: str, config_hash: str, config: dict[str, Any], extra: dict[str, Any] | None = None):
        from litlab.redaction import redact_nested

        self.meta = {"run_id": run_id, "config_hash": config_hash, "config": redact_nested(config),
                     "litlab_version": __version__, **(extra or {})}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = dict(self.meta)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(META_KEY, {})
        if meta and meta.get("run_id") != self.meta["run_id"]:
            raise UserError(f"checkpoint belongs to run {meta.get('run_id')}, not {self.meta['run_id']}")


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt at the end of every training epoch, and every N training steps when asked.

    A ModelCheckpoint keeping no top-k (save_top_k=0, save_last=True) writes last.ckpt at an epoch's
    end only if it saved a top-k checkpoint at the same step (Lightning 2.6), that is never: a run
    killed mid-fit had no last.ckpt to resume from. This one writes it at every epoch end."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # e.g. saved at this step already
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def checkpoint_callbacks(dirpath: Path, monitor: str, mode: str, save_top_k: int,
                         every_n_train_steps: int | None) -> tuple[ModelCheckpoint, ModelCheckpoint]:
    """`best`: top-k on the monitored metric at validation end. `last`: last.ckpt at every epoch
    end, and every N training steps when asked (so a kill loses at most N steps)."""
    best = BestCheckpoint(dirpath=dirpath, filename="best-epoch{epoch:03d}-step{step}", monitor=monitor,
                          mode=mode, save_top_k=save_top_k, auto_insert_metric_name=False)
    last = LastCheckpoint(dirpath=dirpath, monitor=None, save_top_k=0, save_last=True,
                          every_n_train_steps=every_n_train_steps, save_on_train_epoch_end=True)
    return best, last


def find_last_checkpoint(uri: str, run_id: str, checkpoint_dir: str | None) -> Path | None:
    """The run's last.ckpt: in its local checkpoint dir, else downloaded from its artifacts."""
    if checkpoint_dir:
        local = Path(checkpoint_dir) / LAST
        if local.exists():
            return local
    from litlab.tracking_store import client

    c = client(uri)
    try:
        names = {a.path for a in c.list_artifacts(run_id, "checkpoints")}
    except Exception:
        return None
    if f"checkpoints/{LAST}" not in names:
        return None
    dest = Path(checkpoint_dir or Path("mlruns/checkpoints") / run_id)
    dest.mkdir(parents=True, exist_ok=True)
    downloaded = c.download_artifacts(run_id, f"checkpoints/{LAST}", str(dest.parent / ".download"))
    target = dest / LAST
    os.replace(downloaded, target)
    return target


def run_checkpoint(run_id: str, tracking_uri: str | None, key: str) -> Path:
    """The best checkpoint of RUN_ID (else its last.ckpt), for a config arg `key` that names a run
    (e.g. model.pretrained, model.reference); UserError naming `key` when there is none."""
    from litlab import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    try:
        run = tracking.client(uri).get_run(run_id)
    except Exception as e:
        raise UserError(f"{key}: {run_id!r} is neither a checkpoint file nor a run in {uri} ({type(e).__name__}; "
                        "give the .ckpt path, or the --tracking-uri of that run)") from None
    ckpt_dir = run.data.tags.get("litlab.checkpoint_dir")
    best = sorted(Path(ckpt_dir).glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime) \
        if ckpt_dir and Path(ckpt_dir).is_dir() else []
    path = best[-1] if best else find_last_checkpoint(uri, run_id, ckpt_dir)
    if path is None:
        raise UserError(f"{key}: run {run_id} has no checkpoint")
    return Path(path)
