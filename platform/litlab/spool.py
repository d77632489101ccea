"""A local journal of each run's metric points, so no point is lost to a crash or a tracking outage.

`MlflowTracker.log_metrics` appends every point to `<spool_dir>/<run_id>.jsonl` (one JSON line per
call, written through to the OS: a SIGKILL loses nothing, only a power cut could) and a background
thread sends the journal to MLflow from `<run_id>.sent`, the byte offset up to which MLflow has
acknowledged it. While the tracking server is down, training goes on and the journal grows; when
it is back the backlog is sent in `log_batch` calls of up to 1000 points. What could not be sent
before the process ended, including the run's final status, is sent by `litlab resume` or
`litlab sync RUN_ID`. Resending a point MLflow already has is harmless: MLflow's SQL store skips an
identical (key, value, timestamp, step) point.

Files per run: `<id>.jsonl` ([key, value, timestamp_ms, step] per line), `<id>.sent` (offset),
`<id>.status` (a final status MLflow did not get), `<id>.artifacts.jsonl` (files to upload later).
The journal is deleted once everything in it was sent.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Iterator

MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call


def default_spool_dir() -> Path:
    return Path(os.environ.get("LITLAB_SPOOL_DIR", "mlruns/spool")).resolve()


def point_line(key_json: str, value: float, timestamp: int, step: int) -> str:
    """The journal line of one point: what json.dumps([key, value, timestamp, step]) + newline
    writes, without the encoder's per-call machinery (this runs at every logging step). A finite
    float's repr is its JSON text; NaN and the infinities are written as json.dumps writes them."""
    text = repr(value) if math.isfinite(value) else json.dumps(value)
    return f"[{key_json}, {text}, {timestamp}, {step}]\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricSpool:
    def __init__(self, directory: str | Path, run_id: str):
        self.dir = Path(directory)
        self.run_id = run_id
        self.path = self.dir / f"{run_id}.jsonl"
        self.sent_path = self.dir / f"{run_id}.sent"
        self.status_path = self.dir / f"{run_id}.status"
        self.artifacts_path = self.dir / f"{run_id}.artifacts.jsonl"
        self._fd: int | None = None  # the journal, opened for appending on the first point
        self._key_json: dict[str, str] = {}  # metric name -> its JSON string, encoded once
        self._lock = threading.Lock()  # appends (training thread) vs. close()

    # Writing (training thread) --------------------------------------------------------------------
    def append(self, points: list[tuple[str, float, int, int]]) -> None:
        keys = self._key_json
        for p in points:
            if p[0] not in keys:
                keys[p[0]] = json.dumps(p[0])
        data = "".join(point_line(keys[k], float(v), int(t), int(s)) for k, v, t, s in points).encode()
        with self._lock:
            if self._fd is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            while data:  # one write(2), straight to the OS: survives a kill of this process
                data = data[os.write(self._fd, data):]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # Reading and acknowledging (sender) ----------------------------------------------------------
    def sent_offset(self) -> int:
        try:
            return int(self.sent_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def unsent_batches(self, batch_size: int = MAX_BATCH) -> Iterator[tuple[list[tuple], int]]:
        """(points, end offset) batches from the acknowledged offset to the last complete line."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.sent_offset())
            batch, offset = [], f.tell()
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a line still being written (or cut by a kill): not complete yet
                offset += len(line)
                batch.append(tuple(json.loads(line)))
                if len(batch) == batch_size:
                    yield batch, offset
                    batch = []
            if batch:
                yield batch, offset

    def acknowledge(self, offset: int) -> None:
        _atomic_write(self.sent_path, str(offset))

    def pending_points(self) -> int:
        return sum(len(batch) for batch, _ in self.unsent_batches())

    # What the run could not tell MLflow -----------------------------------------------------------
    def record_status(self, status: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.status_path, status)

    def pending_status(self) -> str | None:
        return self.status_path.read_text().strip() if self.status_path.exists() else None

    def record_artifact(self, local_path: str, artifact_path: str | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.artifacts_path, "a", encoding="utf-8") as f:
            f.write(json.dumps([str(local_path), artifact_path]) + "\n")

    def pending_artifacts(self) -> list[tuple[str, str | None]]:
        if not self.artifacts_path.exists():
            return []
        return [tuple(json.loads(line)) for line in self.artifacts_path.read_text().splitlines() if line.strip()]

    def is_empty(self) -> bool:
        return self.pending_points() == 0 and self.pending_status() is None and not self.pending_artifacts()

    def remove(self) -> None:
        self.close()
        for p in (self.path, self.sent_path, self.status_path, self.artifacts_path):
            p.unlink(missing_ok=True)


def send_points(c, spool: MetricSpool) -> int:
    """Send the unsent journal to MLflow (raises on a tracking error, keeping what was sent); returns
    the number of points sent."""
    from mlflow.entities import Metric

    sent = 0
    for batch, offset in spool.unsent_batches():
        c.log_batch(spool.run_id, metrics=[Metric(key=k, value=float(v), timestamp=int(t), step=int(s))
                                           for k, v, t, s in batch])
        spool.acknowledge(offset)
        sent += len(batch)
    return sent


def sync(uri: str, run_id: str, directory: str | Path | None = None) -> dict[str, int | str | None]:
    """Send everything the spool holds for RUN_ID: points, artifacts, then the final status."""
    from litlab.tracking_store import client

    spool = MetricSpool(directory or default_spool_dir(), run_id)
    c = client(uri)
    c.get_run(run_id)  # fails clearly for an unknown run or an unreachable server
    points = send_points(c, spool)
    artifacts = spool.pending_artifacts()
    for local, artifact_path in artifacts:
        if Path(local).exists():
            c.log_artifact(run_id, local, artifact_path)
    spool.artifacts_path.unlink(missing_ok=True)
    status = spool.pending_status()
    if status:
        c.set_terminated(run_id, status=status)
    spool.remove()
    return {"points": points, "artifacts": len(artifacts), "status": status}


def spooled_runs(directory: str | Path | None = None) -> list[str]:
    d = Path(directory or default_spool_dir())
    if not d.is_dir():
        return []
    ids = {p.name.split(".")[0] for p in d.iterdir() if not p.name.startswith(".")}
    return sorted(ids)
