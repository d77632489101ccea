"""Keep secrets out of what a run publishes (not named secrets.py: under DDP Lightning relaunches
`litlab/__main__.py` as a script, so this directory is on sys.path and would shadow the stdlib module).

Keep secrets out of what a run publishes (MLflow params, tags and text artifacts; W&B config).

A secret is the value of an environment variable whose name looks like one (…KEY, …TOKEN,
…SECRET, …PASSWORD, …PASSWD, …CREDENTIAL(S), e.g. WANDB_API_KEY, AWS_SECRET_ACCESS_KEY) and is at
least 6 characters long, or the password part of a URL (postgresql://user:PASSWORD@host/db). They
are replaced by *** wherever litlab writes text to a tracker. A config never reads the environment,
so a secret can only get there by being written into a YAML file or an override; this is the net
under that mistake.
"""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)($|_)", re.IGNORECASE)
URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+):([^@\s/]+)@")
MASK = "***"


def secret_values() -> list[str]:
    """Values of the secret-looking environment variables, longest first (so a secret containing
    another is masked whole)."""
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6}
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, MASK)
    return URL_PASSWORD.sub(rf"\1:{MASK}@", text)


def redact_mapping(mapping: dict[str, Any]) -> dict[str, Any]:
    """Every string value (and str() of other values) with its secrets masked; keys too."""
    secrets = secret_values()
    out = {}
    for k, v in mapping.items():
        clean = redact(v, secrets) if isinstance(v, str) else v
        if not isinstance(v, str) and v is not None and not isinstance(v, (int, float, bool)):
            s = str(v)
            red = redact(s, secrets)
            clean = red if red != s else v
        out[redact(str(k), secrets)] = clean
    return out


def redact_nested(obj: Any, secrets: list[str] | None = None) -> Any:
    """A nested config (dicts, lists, scalars) with every string's secrets masked."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, str):
        return redact(obj, secrets)
    if isinstance(obj, dict):
        return {k: redact_nested(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_nested(v, secrets) for v in obj)
    return obj
