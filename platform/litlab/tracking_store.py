"""The MLflow tracking store and a run's life cycle, without Lightning or torch.

`litlab runs`, `compare`, `sync` and `ui` need only this: importing Lightning (5 to 10 s) is left
to the commands that train. `litlab.tracking` re-exports all of it beside its Lightning logger.

- `resolve_tracking_uri()`: --tracking-uri > tracking.tracking_uri > MLFLOW_TRACKING_URI >
  sqlite:///mlruns/mlflow.db (artifacts beside the DB in mlruns/artifacts); a URI MLflow has no
  store for is one line (tracking_uri.py), for every command.
- `client()`: the first time a process opens a server's store, one TCP connect (server_probe): a
  server that does not answer is one line at once, not MLflow's retries and traceback.
- `start_run()` / `attach_run()` / `end_run()`: create a run with params, tags and the resolved
  config, or re-attach to one for `litlab resume` (same run id).
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import Any

from litlab.server_probe import check_reachable

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
_MAX_PARAMS = 100  # MLflow's limit on params per log_batch call


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The store to use; a UserError (one line) for a URI MLflow has no store for (tracking_uri.py)."""
    from litlab.tracking_uri import check_tracking_uri

    env = os.environ.get("MLFLOW_TRACKING_URI")
    uri = explicit or env or DEFAULT_TRACKING_URI
    check_tracking_uri(uri, " (from MLFLOW_TRACKING_URI)" if not explicit and env else "")
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_absolute():  # pin it so DDP children and `litlab resume` see the same store
            db = Path.cwd() / db
        from litlab.preflight import writable_dir

        writable_dir(db.parent, "the tracking store")
        uri = f"sqlite:///{db}"
    return uri


_ready: set[str] = set()
_answered: set[str] = set()  # stores whose server accepted a connection in this process


# MLflow's REST client retries a failed call for minutes (7 retries, back-off factor 2), blocking
# whoever called. litlab keeps unsent metrics in its spool and retries on its own, so it asks MLflow
# to give up sooner; the user's own settings of these variables win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def check_answers(uri: str) -> None:
    """A UserError (one line) if the store's server (http(s), PostgreSQL, MySQL) does not accept a
    connection now; asked once per store and process (no MLflow import: one TCP connect)."""
    if uri in _answered:
        return
    from litlab.server_probe import database_unreachable, unreachable

    reason = unreachable(uri) or database_unreachable(uri)
    if reason:
        from litlab.errors import UserError
        from litlab.tracking_uri import unreachable_line

        raise UserError(unreachable_line(uri, reason))
    _answered.add(uri)


def client(uri: str):
    """An MlflowClient of the store. The first time a process opens a server's store (http(s),
    PostgreSQL, MySQL), a server that does not answer is a UserError at once (check_answers): one
    line, before MLflow's import and its retries, before any run exists. Later calls leave an
    outage to their callers (check_reachable, the spool)."""
    check_answers(uri)
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///") and uri not in _ready:
        from litlab.sqlite_template import ensure_store

        ensure_store(Path(uri[len("sqlite:///"):]))
        _ready.add(uri)
    return MlflowClient(tracking_uri=uri)


def find_run(uri: str, run_id: str):
    """The MLflow run RUN_ID of the store `uri`; a UserError (one line) if there is none."""
    from mlflow.exceptions import MlflowException

    from litlab.errors import UserError

    try:
        return client(uri).get_run(run_id)
    except MlflowException:
        raise UserError(f"no run {run_id!r} in the tracking store {uri} (list them with `litlab runs`)") from None


def artifact_root(uri: str) -> str | None:
    """For a local SQLite store, artifacts live beside the DB: <dir>/artifacts/<experiment>."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None  # a server decides (proxied artifacts)


def get_or_create_experiment(c, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = artifact_root(uri)
    try:
        return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    except MlflowException:  # created by a parallel process in between
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
              config_yaml: str, parent_run_id: str | None = None) -> str:
    """Create a RUNNING run holding the flattened config as params, tags and config/resolved.yaml."""
    from mlflow.entities import Param

    from litlab.redaction import redact, redact_mapping

    params, tags, config_yaml = redact_mapping(params), redact_mapping(tags), redact(config_yaml)
    run_name = redact(run_name)
    c = client(uri)
    exp_id = get_or_create_experiment(c, uri, experiment)
    all_tags = {"mlflow.runName": run_name, "mlflow.user": _user(), **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    plist = [Param(k, _param_str(v)) for k, v in params.items()]
    for chunk in _chunks(plist, _MAX_PARAMS):
        c.log_batch(run_id, params=chunk)
    c.log_text(run_id, config_yaml, "config/resolved.yaml")
    return run_id


def attach_run(uri: str, run_id: str, tags: dict[str, str], new_params: dict[str, Any]) -> dict[str, int]:
    """Mark a run RUNNING again for resume; return {metric key: last logged step}."""
    from mlflow.entities import Param, RunTag

    from litlab.redaction import redact_mapping

    tags, new_params = redact_mapping(tags), redact_mapping(new_params)
    c = client(uri)
    run = c.get_run(run_id)
    c.update_run(run_id, status="RUNNING")
    known = set(run.data.params)
    plist = [Param(k, _param_str(v)) for k, v in new_params.items() if k not in known]
    for chunk in _chunks(plist, _MAX_PARAMS):
        c.log_batch(run_id, params=chunk)
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    # run.data holds, per key, the value at its largest step: enough to skip replayed steps.
    return {m.key: m.step for m in run.data._metric_objs}


def end_run(uri: str, run_id: str, status: str) -> bool:
    """Mark the run ended; if the server cannot be reached, keep the status for `litlab sync`."""
    try:
        check_reachable(uri)
        client(uri).set_terminated(run_id, status=status)
        return True
    except Exception as e:  # never hide the real error behind a tracking one
        from litlab.spool import MetricSpool, default_spool_dir

        MetricSpool(default_spool_dir(), run_id).record_status(status)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print(f"litlab: warning: could not mark run {run_id} {status} ({first}); kept for "
              f"`litlab sync {run_id}`", file=sys.stderr)
        return False


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    from litlab.redaction import redact_mapping

    tags = redact_mapping(tags)
    check_reachable(uri)
    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _param_str(v: Any) -> str:
    s = "null" if v is None else str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"
