"""Checks before a run starts, so a full or unwritable disk is one clear line, not a crash hours in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from litlab.errors import UserError

MIN_FREE_BYTES = int(os.environ.get("LITLAB_MIN_FREE_MB", "100")) * 1024 * 1024


def writable_dir(path: str | Path, what: str) -> Path:
    """Create `path` if needed and prove it takes a file; UserError (one line) if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".litlab-write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write {what} to {path}: {e.strerror or e}; free some space, fix the permissions "
                        "or choose another directory") from None
    return path


def enough_space(path: str | Path, what: str, needed: int = MIN_FREE_BYTES) -> None:
    free = shutil.disk_usage(path).free
    if free < needed:
        raise UserError(f"only {free / 2**20:.0f} MiB free for {what} in {path} (litlab wants at least "
                        f"{needed / 2**20:.0f} MiB; set LITLAB_MIN_FREE_MB to change it): free some space first")


def check_run_dirs(checkpoint_dir: str | Path, spool_dir: str | Path) -> None:
    for path, what in ((checkpoint_dir, "checkpoints"), (spool_dir, "the metric spool")):
        enough_space(writable_dir(path, what), what)
