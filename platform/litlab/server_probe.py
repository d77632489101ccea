"""Is an HTTP tracking server there at all? One TCP connect, no HTTP request.

MLflow's REST client answers a refused connection only after its retries (7 s with litlab's
settings, minutes with MLflow's own), blocking whoever called. litlab asks this before each of its
calls to an http(s) server (one TCP handshake, every `flush_interval` at most for the metrics): a
refused connection answers at once, so a run ending during an outage keeps to its `flush_timeout`
and files go straight to the spool. Only a reachable server gets the real call (and MLflow's
retries, which still cover its other errors)."""

from __future__ import annotations

import socket
import urllib.request
from urllib.parse import urlsplit


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
