"""Test-wide settings: nothing downloads, nothing tracks outside a temporary store."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("PYTHONHASHSEED", "0")
# One intra-op thread: tiny models gain nothing from more, and on 2 busy cores OpenMP spinning makes
# steps 10-100x slower. Subprocesses (CLI, DDP ranks) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

import pytest  # noqa: E402


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A private sqlite MLflow store; the test runs with its cwd in tmp_path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    return f"sqlite:///{tmp_path}/mlruns/mlflow.db"
