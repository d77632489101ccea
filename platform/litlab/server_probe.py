"""Is an HTTP tracking server there at all? One TCP connect, no HTTP request.

MLflow's REST client answers a refused connection only after its retries (7 s with litlab's
settings, minutes with MLflow's own), blocking whoever called. litlab asks this before each of its
calls to an http(s) server (one TCP handshake, every `flush_interval` at most for the metrics): a
refused connection answers at once, so a run ending during an outage keeps to its `flush_timeout`
and files go straight to the spool. Only a reachable server gets the real call (and MLflow's
retries, which still cover its other errors). tracking_store.client() asks it once more, the first
time a process opens the store (`litlab runs`, `compare`, `resume`, the start of `run` and `sweep`):
a server that is not there is then one line at once instead of MLflow's retries and a traceback;
database servers (PostgreSQL, MySQL) too, which MLflow retries for minutes."""

from __future__ import annotations

import socket
import urllib.request
from urllib.parse import parse_qs, urlsplit

DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306}  # mssql is left out: its URIs often name an ODBC DSN


def unreachable(uri: str, timeout: float = 2.0) -> str | None:
    """Why an http(s) tracking URI cannot be reached now (None: it accepts a connection, or it is not
    http(s), or a proxy stands between: only the proxy could tell)."""
    if not uri.startswith(("http://", "https://")):
        return None
    parts = urlsplit(uri)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a malformed port: let MLflow report it
        return None
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return None
    return _connect(host, port, timeout)


def database_unreachable(uri: str, timeout: float = 2.0) -> str | None:
    """The same for a PostgreSQL or MySQL store that names its server's host (None for a Unix socket,
    several hosts, or another store): asked once when a command opens the store, since MLflow
    retries a database it cannot reach for minutes before its traceback."""
    parts = urlsplit(uri)
    kind = parts.scheme.split("+")[0].lower()
    if kind not in DATABASE_PORTS or "," in parts.netloc or not parts.hostname:
        return None
    if {"host", "hostaddr", "unix_socket", "service"} & set(parse_qs(parts.query)):
        return None
    try:
        port = parts.port or DATABASE_PORTS[kind]
    except ValueError:
        return None
    return _connect(parts.hostname, port, timeout)


def _connect(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"cannot connect to {host}:{port} ({e.strerror or type(e).__name__})"


def check_reachable(uri: str) -> None:
    """Raise ConnectionError at once if an http(s) tracking server refuses connections."""
    reason = unreachable(uri)
    if reason:
        raise ConnectionError(reason)
