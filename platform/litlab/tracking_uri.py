"""Is a tracking URI one MLflow can open? Checked before MLflow's import and before any run exists.

MLflow answers a URI it cannot use late and long: an unknown scheme is an
UnsupportedModelRegistryStoreURIException traceback, a path without a scheme (a typo such as
`http//host:5000` is one) or a `file:` URI is MLflow 3's "filesystem tracking backend is in
maintenance mode" traceback, and a server that is not there is a traceback after its retries. Here
each is one line (a UserError) naming the URI and what to give instead. Imports nothing heavy: the
schemes are MLflow's own (mlflow/tracking/_tracking_service/utils.py), plus any that an installed
plugin registers under the entry point group `mlflow.tracking_store`.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

from litlab.errors import UserError

DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # with an optional +driver
SERVER_SCHEMES = ("http", "https")
DATABRICKS_SCHEMES = ("databricks", "databricks-uc", "uc")
FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"  # MLflow's own opt-in to its file store
SUPPORTED = ("sqlite:///PATH/mlflow.db, postgresql://..., mysql://..., mssql://..., http://HOST:PORT, "
             "https://HOST, databricks, databricks-uc, uc")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_SERVER_TYPO = re.compile(r"^(https?)(?::/?|//)(?!/)(.+)$", re.IGNORECASE)  # http//h, http:/h, http:h
_PASSWORD = re.compile(r"(?<=:)[^:@/\s'\"]+(?=@)")  # user:PASSWORD@host
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-]+:\d+(/.*)?$")  # localhost:5000, 127.0.0.1:5000


def check_tracking_uri(uri: str, origin: str = "") -> None:
    """Raise UserError (one line) unless MLflow has a store for `uri`; `origin` says where it came from
    (e.g. ' (from MLFLOW_TRACKING_URI)'). Whether its server answers is asked when it is opened
    (tracking_store.client). A password in the URI is masked in the line."""
    problem = _problem(uri)
    if problem:
        raise UserError(_masked(f"tracking URI {uri!r}{origin}{problem}"))


def _problem(uri: str) -> str | None:
    """What is wrong with `uri`, as the rest of the line after the URI, or None."""
    if not uri.strip() or uri != uri.strip():
        return ": empty or with spaces around it; give e.g. sqlite:///mlruns/mlflow.db or http://127.0.0.1:5000"
    if uri in DATABRICKS_SCHEMES:
        return None
    if _HOST_PORT.match(uri):
        return f": no scheme; did you mean http://{uri}?"
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match and len(match.group(1)) > 1 else ""  # C:\... is a path
    if scheme in DATABRICKS_SCHEMES:
        return None
    if scheme.split("+")[0] in DATABASE_SCHEMES:
        if scheme.count("+") > 1 or not uri[len(scheme) + 1:].startswith("//"):
            return (f": a database URI looks like {scheme.split('+')[0]}://... (e.g. sqlite:///PATH/mlflow.db, "
                    "postgresql://USER@HOST/DB)")
        return None
    if scheme in SERVER_SCHEMES:
        return _server_problem(uri)
    if scheme in ("", "file"):
        if _file_store_allowed():
            return None
        typo = _SERVER_TYPO.match(uri) if scheme == "" else None
        if typo:
            return (": no scheme, so MLflow would take it for a directory (a file store, which MLflow 3 refuses); "
                    f"did you mean {typo.group(1).lower()}://{typo.group(2)}?")
        path = urlsplit(uri).path if scheme == "file" else uri
        kind = " is a file: URI" if scheme == "file" else " has no scheme, so MLflow takes it for a directory"
        return (f"{kind}: MLflow 3 refuses that file store; give sqlite:///{path.rstrip('/') or '.'}/mlflow.db "
                f"(or set {FILE_STORE_ENV}=true to use the file store anyway)")
    if scheme in _plugin_schemes():
        return None
    return f": unknown scheme {scheme + '://'!r}; MLflow supports {SUPPORTED}"


def _server_problem(uri: str) -> str | None:
    parts = urlsplit(uri)
    if not parts.hostname:
        typo = _SERVER_TYPO.match(uri)
        return ": no host; " + (f"did you mean {typo.group(1).lower()}://{typo.group(2)}?" if typo else
                                f"a server URI looks like {parts.scheme}://HOST:PORT (e.g. http://127.0.0.1:5000)")
    try:
        parts.port
    except ValueError:
        return f": the port is not a number from 0 to 65535 (a server URI looks like {parts.scheme}://HOST:PORT)"
    return None


def _masked(line: str) -> str:
    """The line with a URI's password masked, even in a malformed URI (user:PASSWORD@host)."""
    from litlab.redaction import redact

    return _PASSWORD.sub("***", redact(line))


def _file_store_allowed() -> bool:
    return os.environ.get(FILE_STORE_ENV, "").strip().lower() in ("true", "1")


def _plugin_schemes() -> set[str]:
    """Schemes that installed MLflow plugins register (only asked about a scheme litlab does not know)."""
    from importlib.metadata import entry_points

    try:
        return {ep.name.lower() for ep in entry_points(group="mlflow.tracking_store")}
    except Exception:  # a broken distribution's metadata: no plugins then
        return set()


def unreachable_line(uri: str, reason: str) -> str:
    """The one line for a tracking store whose server does not answer (a password in it masked)."""
    start = " (e.g. `mlflow server --host 127.0.0.1 --port PORT`)" if uri.startswith("http") else ""
    return _masked(f"tracking URI {uri!r}: no server answering at that address ({reason}); start it{start} "
                  "or give another --tracking-uri")
