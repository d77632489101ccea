"""A run tracks everything the design card lists; the MLP learns; W&B works offline."""

from __future__ import annotations

import threading
import time

import torch
import yaml
from mlflow import MlflowClient

from helpers import MLP_DIGITS, QUICK, all_runs, metric_steps
from litlab import runner
from litlab.checkpointing import META_KEY


def test_run_tracks_params_metrics_tags_artifacts_checkpoints(tracking_uri):
    senders_before = {t for t in threading.enumerate() if t.name == "litlab-mlflow"}
    result = runner.run(MLP_DIGITS, QUICK + ["trainer.max_epochs=3"], tracking_uri=tracking_uri)
    # the run's background sender ends with it (a notebook or a benchmark runs many in one process)
    assert {t for t in threading.enumerate() if t.name == "litlab-mlflow"} <= senders_before
    c = MlflowClient(tracking_uri=tracking_uri)
    run = c.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [r.info.run_id for r in all_runs(tracking_uri)] == [result.run_id]

    # params: the flattened resolved config, defaults included
    p = run.data.params
    assert p["model.name"] == "mlp" and p["model.hidden"] == "[32]" and p["trainer.max_epochs"] == "3"
    assert "optim.lr" in p and "optim.scheduler.name" in p and "model.num_classes" in p and "seed" in p

    # metrics by step and epoch, and test metrics
    m = run.data.metrics
    for key in ("train/loss_step", "train/loss_epoch", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc", "epoch"):
        assert key in m, key
    assert any(k.startswith("system/cpu") for k in m), "no system metrics"
    steps = metric_steps(tracking_uri, result.run_id)
    assert len(steps["val/acc"]) == 3
    assert result.metrics["test/acc"] == m["test/acc"]

    # tags
    t = run.data.tags
    assert t["litlab.model"] == "mlp" and t["litlab.chapter"].startswith("1-2")
    for key in ("git.commit", "git.dirty", "torch.version", "lightning.version", "litlab.version", "device",
                "litlab.config_hash"):
        assert t.get(key), key
    assert t["device"].startswith("cpu")

    # artifacts: config, checkpoints, learning curve
    arts = {a.path for a in c.list_artifacts(result.run_id)} | {
        a.path for d in ("config", "checkpoints", "plots") for a in c.list_artifacts(result.run_id, d)}
    for path in ("config/resolved.yaml", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "plots/learning_curves.png"):
        assert path in arts, (path, arts)
    resolved = yaml.safe_load(open(c.download_artifacts(result.run_id, "config/resolved.yaml")))
    assert resolved["model"]["hidden"] == [32] and resolved["trainer"]["max_epochs"] == 3

    # every checkpoint carries the run id and config hash
    ckpt = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)
    assert ckpt[META_KEY]["run_id"] == result.run_id
    assert ckpt[META_KEY]["config_hash"] == t["litlab.config_hash"]


def test_mlp_learns_digits(tracking_uri):
    """The default experiment: >= 0.95 test accuracy, seeded, CPU, within 60 s."""
    start = time.perf_counter()
    result = runner.run(MLP_DIGITS, ["tracking.system_metrics=false"], tracking_uri=tracking_uri)
    elapsed = time.perf_counter() - start
    assert result.metrics["test/acc"] >= 0.95, result.metrics
    assert elapsed <= 60, f"took {elapsed:.1f} s"


def test_wandb_offline_needs_no_network(tracking_uri, tmp_path):
    result = runner.run(MLP_DIGITS, QUICK + ["trainer.max_epochs=1", "tracking.wandb=offline",
                                             "tracking.system_metrics=false"], tracking_uri=tracking_uri)
    assert result.status == "FINISHED"
    offline_runs = list((tmp_path / "mlruns" / "wandb").rglob(f"offline-run-*{result.run_id}*"))
    assert offline_runs, "no offline W&B run written"


def test_tracking_disabled_still_checkpoints(tracking_uri, tmp_path):
    result = runner.run(MLP_DIGITS, QUICK + ["trainer.max_epochs=1", "tracking.mlflow=false"], tracking_uri=tracking_uri)
    assert result.status == "FINISHED" and result.best_checkpoint
    assert not all_runs(tracking_uri)


def test_the_journal_lines_are_what_json_dumps_writes_and_read_back(tmp_path):
    """The spool formats its lines itself (at every logging step): each is json.dumps of the
    point, non-finite values and names that need escaping included, and reads back as written."""
    import json
    import math

    from litlab.spool import MetricSpool

    points = [("train/loss_step", 0.1, 1700000000123, 0), ('odd "name" \u00e9\\', -0.0, 1, 2),
              ("x", float("nan"), 3, 4), ("x", float("inf"), 3, 5), ("x", float("-inf"), 3, 6),
              ("z", 5e-324, 1, 7), ("z", 1e22, 1, 8), ("z", 1 / 3, 1, 9), ("epoch", 3, 1, 10)]
    spool = MetricSpool(tmp_path, "run")
    spool.append(points[:3])
    spool.append(points[3:])
    spool.close()
    lines = spool.path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert lines == [json.dumps([k, float(v), t, s]) + "\n" for k, v, t, s in points]
    (read, end), = spool.unsent_batches()
    assert end == spool.path.stat().st_size
    for (k, v, t, s), (k2, v2, t2, s2) in zip(points, read, strict=True):
        assert (k, t, s) == (k2, t2, s2) and (math.isnan(v2) if v != v else (v2 == v and math.copysign(1, v2) == math.copysign(1, v)))
