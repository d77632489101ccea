"""Where a run came from: git commit and dirty flag, library versions, host, device."""

from __future__ import annotations

import os
import platform as _stdlib_platform  # the standard library module (never shadowed: see pyproject)
import socket
import subprocess
import sys
from pathlib import Path

from litlab import __version__


def git_info(where: Path) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit, "git.dirty": str(bool(dirty)).lower(), "mlflow.source.git.commit": commit}


def version_tags() -> dict[str, str]:
    import lightning
    import torch

    return {
        "litlab.version": __version__,
        "torch.version": torch.__version__,
        "lightning.version": lightning.__version__,
        "python.version": _stdlib_platform.python_version(),
        "host": socket.gethostname(),
        "litlab.pid": str(os.getpid()),
        "litlab.command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:5000],
    }


def device_description(trainer) -> str:
    """e.g. 'cpu x2 (ddp)' or 'cuda: NVIDIA H100 80GB HBM3 x1 (bf16-mixed)'."""
    dev = trainer.strategy.root_device
    name = dev.type
    if dev.type == "cuda":
        import torch

        name = f"cuda: {torch.cuda.get_device_name(dev)}"
    strategy = type(trainer.strategy).__name__.replace("Strategy", "").lower() or "single"
    return f"{name} x{trainer.num_devices * trainer.num_nodes} ({strategy}, precision {trainer.precision})"


def process_alive(host: str | None, pid: str | None) -> bool:
    """True when the run's process is still alive on this very host."""
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return True
    return "litlab" in cmdline or "python" in cmdline
