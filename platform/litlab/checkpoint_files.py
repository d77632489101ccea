"""Reading litlab's checkpoint files safely, with torch alone (no Lightning: `litlab resume` reads a
run's config from its last.ckpt before the ~9 s import of Lightning). litlab.checkpointing
re-exports these and writes the files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from litlab.errors import UserError

META_KEY = "litlab"
LAST = "last.ckpt"
ALLOW_EXTERNAL_ENV = "LITLAB_ALLOW_EXTERNAL_CHECKPOINTS"  # `--allow-external-checkpoints`


def is_litlab_path(path: str | Path) -> bool:
    """Inside an mlruns/ directory (where litlab writes and downloads checkpoints)."""
    return "mlruns" in Path(path).resolve().parts


def load_checkpoint(path: str | Path, *, mmap: bool = False, trusted: bool = False) -> dict[str, Any]:
    """torch.load a checkpoint safely: tensors and plain data only (weights_only=True, never
    arbitrary pickled code), and a file from outside mlruns/ only when the user allowed it
    (--allow-external-checkpoints), since a shared checkpoint is code as much as data."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint")
    if not trusted and not is_litlab_path(path) and os.environ.get(ALLOW_EXTERNAL_ENV) != "1":
        raise UserError(f"{path} is not under an mlruns/ directory; load a checkpoint from elsewhere only if you "
                        "trust it, with --allow-external-checkpoints")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable checkpoint of plain tensors ({type(e).__name__}: {first})") from None


def read_metadata(path: str | Path, trusted: bool = False) -> dict[str, Any]:
    """The litlab block of a checkpoint, memory-mapped so large weights are not read."""
    return read_resume_point(path, trusted)[0]


def read_resume_point(path: str | Path, trusted: bool = False) -> tuple[dict[str, Any], int]:
    """The litlab block of a checkpoint and the epochs it has trained in full (Lightning's fit-loop
    progress: an epoch counts once its training batches ran; the epoch a mid-epoch save is in does
    not), memory-mapped so large weights are not read."""
    ckpt = load_checkpoint(path, mmap=True, trusted=trusted)
    meta = ckpt.get(META_KEY)
    if not meta:
        raise UserError(f"{path}: not a litlab checkpoint (no run metadata)")
    try:
        trained = int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        trained = int(ckpt.get("epoch", 0))
    return meta, trained
