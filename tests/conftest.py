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


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server for the session (tests/postgres.py): a SQLAlchemy URL,
    `postgresql+psycopg2://litlab:...@127.0.0.1:PORT/litlab`. Skipped where PostgreSQL or psycopg2
    is not installed; under CI (which installs both, see .ci/run) that is a failure instead."""
    from postgres import PostgresUnavailable, postgres_server

    missing = pytest.fail if os.environ.get("CI") else pytest.skip
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        missing("psycopg2 not installed: pip install -e '.[dev]' (or '.[postgres]')")
    try:
        with postgres_server() as url:
            yield url
    except PostgresUnavailable as e:  # raised before the yield only
        missing(str(e))


def pytest_runtest_logreport(report):
    """LITLAB_TEST_LOG=FILE: each test's outcome, and a failure's traceback, appended to FILE as the
    test ends, so a run stopped from outside (a GPU session's time limit) keeps why tests failed."""
    path = os.environ.get("LITLAB_TEST_LOG")
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # under pytest-xdist the controller writes each report
    if not path or worker or (report.when != "call" and report.passed):
        return
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"{report.outcome.upper():7} {report.nodeid} ({report.when}, {report.duration:.1f} s)\n")
        if report.failed:
            log.write(report.longreprtext[-4000:].rstrip() + "\n\n")
