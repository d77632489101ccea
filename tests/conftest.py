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


_XDIST_WORKER = False  # this process is a pytest-xdist worker (its controller writes each report)


def pytest_configure(config):
    global _XDIST_WORKER
    # config.workerinput, not $PYTEST_XDIST_WORKER: a pytest started by a test that runs under
    # xdist (tests/test_benchmarks.py runs gpu_session.sh) inherits that variable, yet is no worker
    _XDIST_WORKER = hasattr(config, "workerinput")


def pytest_runtest_logreport(report):
    """LITLAB_TEST_LOG=FILE: each test's outcome, and a failure's traceback, appended to FILE as the
    test ends, so a run stopped from outside (a GPU session's time limit) keeps why tests failed."""
    path = os.environ.get("LITLAB_TEST_LOG")
    if not path or _XDIST_WORKER or (report.when != "call" and report.passed):
        return
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"{report.outcome.upper():7} {report.nodeid} ({report.when}, {report.duration:.1f} s)\n")
        if report.failed:
            log.write(report.longreprtext[-4000:].rstrip() + "\n\n")
