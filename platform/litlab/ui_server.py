"""`litlab ui`: the MLflow UI over litlab's tracking store.

MLflow's server reports a port it cannot take as a traceback (a port past 65535) or a log line, and
then exits 0 (a port in use): the address is tried here first, so that either is one line and exit
status 2 before the server starts.
"""

from __future__ import annotations

import errno
import os
import socket
import sys

from litlab.errors import UserError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_address(host: str, port: int) -> None:
    """Raise UserError unless the server could listen on host:port now (bound and let go at once;
    SO_REUSEADDR as uvicorn sets it, so a port left in TIME_WAIT by the last UI is not refused)."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: a port is a number from 1 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise UserError(f"--host {host!r}: not a name or address this machine can resolve") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use (another `litlab ui` or MLflow server?): "
                                "choose another with --port N") from None
            if e.errno == errno.EACCES:
                raise UserError(f"--port {port}: ports below 1024 need administrator rights; "
                                "choose one from 1024 to 65535") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"--host {host!r}: not an address of this machine "
                                "(127.0.0.1 for this machine only, 0.0.0.0 for every interface)") from None
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def serve(host: str, port: int, tracking_uri: str | None) -> None:
    """Replace this process with `mlflow ui` on host:port over the store (one worker)."""
    from litlab.tracking_store import artifact_root, resolve_tracking_uri

    check_address(host, port)
    uri = resolve_tracking_uri(tracking_uri)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    root = artifact_root(uri)  # a local SQLite store: artifacts beside it, where litlab's runs put them
    if root:
        cmd += ["--default-artifact-root", root]
    if host not in LOCAL_HOSTS:
        print(f"litlab ui: warning: listening on {host}: anyone who can reach this machine can read (and "
              "change) your runs; MLflow has no login here", file=sys.stderr)
    # MLflow's job runner (GenAI jobs and periodic trace tasks, unused by training runs) is 8 more
    # processes: 1.7 GiB instead of 0.5, and a slower start. The user's own setting wins.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(f"MLflow UI on http://{host}:{port}  (store {uri}; Ctrl+C to stop)", file=sys.stderr, flush=True)
    os.execv(sys.executable, cmd)
