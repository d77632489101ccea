"""Performance: the speed-ups change no result, and the CLI starts fast.

- the lean training step (litlab.fast_loop) trains bit for bit what Lightning's loop trains;
- the in-memory loader's index tensors are the batches (and augmentation seeds) of
  ResumableBatchSampler; step metrics sent to MLflow asynchronously land as the synchronous ones;
- gradient clipping works with a fused optimiser under bf16-mixed (Lightning refuses it);
- `litlab --help` and `litlab models` answer in well under a second, without importing torch;
- litlab's training-step throughput on the digits MLP against a hand-written loop: a LOOSE bar
  (best of 3, the training thread's CPU time) that a noisy shared CI machine passes; the strict
  goals are measured by benchmarks/throughput.py (README "Performance").
"""

from __future__ import annotations

import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from mlflow import MlflowClient

from helpers import MLP_DIGITS, REPO, cli_env
from litlab import runner
from litlab.fast_loop import LeanTrainingEpochLoop

sys.path.insert(0, str(REPO / "benchmarks"))

SMALL = ["model.hidden=[16]", "data.batch_size=50", "trainer.max_epochs=2", "tracking.system_metrics=false"]


class Seen(L.Callback):
    """Keeps the trainer's epoch loop, the clipped gradients' norm after every step and the logger
    connector's metric dicts before every step; with `log_step`, also logs a value on_step and
    on_epoch through self.log at every batch end (as a user's callback or module would)."""

    def __init__(self, log_step: bool = False):
        self.log_step = log_step
        self.loop = None
        self.plans = []
        self.unrolled_fetch = []
        self.grad_norms = []
        self.step_dicts = []  # the logger connector's dicts as each batch starts

    def on_train_epoch_start(self, trainer, pl_module):
        self.loop = trainer.fit_loop.epoch_loop

    def on_train_epoch_end(self, trainer, pl_module):
        c = trainer._logger_connector  # the epoch's last batch leaves the three dicts as Lightning does
        self.step_dicts.append([{k: float(v) for k, v in d.items()}
                                for d in (c._logged_metrics, c._progress_bar_metrics, c._callback_metrics)])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # the logger and callback dicts as the last batch's end left them (their properties would
        # recompute them); the progress bar's as a progress bar reads them (litlab's lean step
        # leaves them to be computed when read: converting them at every step is a host sync)
        c = trainer._logger_connector
        self.step_dicts.append([{k: float(v) for k, v in d.items()}
                                for d in (c._logged_metrics, trainer.progress_bar_metrics, c._callback_metrics)])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        plan = getattr(self.loop, "_plan", None)
        self.plans.append(plan is not None)
        self.unrolled_fetch.append(plan is not None and plan["cycle"] is not None)
        if self.log_step:
            pl_module.log("seen/loss", outputs["loss"], on_step=True, on_epoch=True, prog_bar=True)
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _history(uri: str, run_id: str) -> dict:
    c = MlflowClient(tracking_uri=uri)
    return {k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, k)) for k in c.get_run(run_id).data.metrics}


@pytest.mark.parametrize("extra, log_step", [
    (["model.dropout=0.2", "data.augment=true", "trainer.gradient_clip_val=0.5", "trainer.log_every_n_steps=3",
      "callbacks.checkpoint.every_n_train_steps=7", "trainer.limit_train_batches=17", "trainer.max_steps=30"], False),
    (["trainer.skip_nonfinite=true", "trainer.precision=bf16-mixed", "trainer.val_check_interval=0.5",
      "optim.name=sgd", "optim.momentum=0.9", "trainer.log_every_n_steps=1"], True),
    (["trainer.max_epochs=4", "trainer.check_val_every_n_epoch=2", "trainer.val_check_interval=0.25",
      "callbacks.early_stopping.enabled=true", "callbacks.early_stopping.patience=1",
      "callbacks.early_stopping.min_delta=10"], False),
], ids=["dropout-augment-clip", "skip-bf16-sgd-steplog", "val-every-2-epochs-early-stop"])
def test_fast_loop_trains_bit_for_bit_what_lightning_trains(tracking_uri, extra, log_step):
    out = {}
    for fast in (True, False):
        seen = Seen(log_step)
        result = runner.run(MLP_DIGITS, [*SMALL, *extra, f"trainer.fast_loop={str(fast).lower()}"],
                            tracking_uri=tracking_uri, callbacks=[seen], quiet=True)
        assert isinstance(seen.loop, LeanTrainingEpochLoop) == fast
        assert all(seen.plans) == fast  # the lean path ran every step (or never)
        assert all(seen.unrolled_fetch) == fast  # with its unrolled fetch of the one training loader
        ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=False)
        out[fast] = ckpt, _history(tracking_uri, result.run_id), result.metrics, seen.step_dicts
        if "trainer.max_steps=30" in extra:  # stopped in mid-epoch by max_steps, after its 30th batch
            assert len(seen.grad_norms) == 30
    (fast_ckpt, fast_hist, fast_test, fast_dicts), (slow_ckpt, slow_hist, slow_test, slow_dicts) = out[True], out[False]
    assert fast_dicts == slow_dicts  # logged, progress-bar and callback metrics after every step
    assert any("train/loss" in callback for _, _, callback in fast_dicts)
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "global_step", "epoch"):
        assert _equal(fast_ckpt[key], slow_ckpt[key]), key
    assert fast_hist == slow_hist and fast_test == slow_test
    assert {"train/loss_step", "train/loss_epoch", "train/acc", "val/acc", "epoch"} <= set(fast_hist)
    if "callbacks.early_stopping.enabled=true" in extra:  # stopped in mid-epoch, by should_stop
        assert fast_ckpt["epoch"] < 3
    if log_step:  # values logged on_step reach the loggers and the progress bar at every step
        assert {"seen/loss_step", "seen/loss_epoch"} <= set(fast_hist)
        assert all("seen/loss_step" in pbar for _, pbar, _ in fast_dicts[1:])


def test_fast_loop_stands_aside_where_it_would_compute_differently(tracking_uri):
    seen = Seen()
    runner.run(MLP_DIGITS, [*SMALL, "trainer.accumulate_grad_batches=2", "tracking.mlflow=false"],
               tracking_uri=tracking_uri, callbacks=[seen], quiet=True)
    assert isinstance(seen.loop, LeanTrainingEpochLoop) and not any(seen.plans)  # Lightning's own advance()


def test_idle_hooks_are_left_out_and_the_hook_name_is_set_where_setattr_would_set_it():
    """The guard's on_before_optimizer_step does nothing unless it skips batches, and the exact
    resume's on_train_batch_start once no restored state waits: left out of the lean step then,
    kept otherwise. `_current_fx_name` goes to the instance dict for nn.Module's
    __setattr__ and litlab's (which says it is the same for that name), through any other."""
    from litlab.lean_plan import FxNameSetter, fx_names, idle_per_step
    from litlab.guards import NonFiniteGuard
    from litlab.module import ClassifierModule
    from litlab.resume_state import KEY, ExactResume

    assert idle_per_step(NonFiniteGuard(skip=False), "on_before_optimizer_step")
    assert not idle_per_step(NonFiniteGuard(skip=True), "on_before_optimizer_step")
    assert not any(idle_per_step(NonFiniteGuard(skip=s), "on_before_backward") for s in (False, True))
    resume = ExactResume()  # its batch start restores a checkpoint's state: only while one waits
    assert idle_per_step(resume, "on_train_batch_start") and not idle_per_step(resume, "on_train_batch_end")
    resume.on_load_checkpoint(None, None, {})
    assert idle_per_step(resume, "on_train_batch_start")  # a checkpoint without exact-resume state
    resume.on_load_checkpoint(None, None, {KEY: {"rng": None}})
    assert not idle_per_step(resume, "on_train_batch_start")

    class Custom(L.LightningModule):
        def __setattr__(self, name, value):
            self.__dict__.setdefault("set_names", []).append(name)
            super().__setattr__(name, value)

    for module, direct in ((ClassifierModule(3), True), (L.LightningModule(), True), (Custom(), False)):
        store = fx_names(module)
        assert (store is vars(module)) == direct and isinstance(store, dict | FxNameSetter)
        store["_current_fx_name"] = "training_step"
        assert module._current_fx_name == "training_step" and store["_current_fx_name"] == "training_step"
    assert module.set_names[-1] == "_current_fx_name"  # Custom's own __setattr__ saw it


def test_gradient_clipping_with_a_fused_optimizer_under_bf16_mixed(tracking_uri):
    """Lightning raises for clipping + fused AdamW under mixed precision; litlab clips by hand."""
    seen = Seen()
    result = runner.run(MLP_DIGITS, [*SMALL, "optim.name=adamw", "optim.lr=0.01", "trainer.precision=bf16-mixed",
                                     "trainer.gradient_clip_val=0.05", "tracking.mlflow=false"],
                        tracking_uri=tracking_uri, callbacks=[seen], quiet=True)
    assert result.status == "FINISHED"
    assert max(seen.grad_norms) <= 0.05 * (1 + 1e-4)  # ||g|| after clipping, as the fused step saw it


def test_speed_settings_are_validated():
    from types import SimpleNamespace

    from litlab.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.compile_mode"):
        runner.load_config(MLP_DIGITS, ["trainer.compile_mode=reduce-overhead"])
    cfg = runner.load_config(MLP_DIGITS, ["trainer.compile=true"])
    cpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    with pytest.raises(ConfigError, match="no `net` module to compile"):
        runner._speed_settings(cfg, torch.nn.Linear(2, 2), cpu)


@pytest.mark.slow
def test_compile_trains_and_keeps_the_checkpoint_keys(tracking_uri):
    args = [*SMALL, "tracking.mlflow=false"]
    eager = runner.run(MLP_DIGITS, args, tracking_uri=tracking_uri, quiet=True)
    compiled = runner.run(MLP_DIGITS, [*args, "trainer.compile=true"], tracking_uri=tracking_uri, quiet=True)
    assert compiled.status == "FINISHED" and compiled.metrics["test/acc"] > 0.3  # 10 classes: chance is 0.1
    assert compiled.metrics["test/acc"] == pytest.approx(eager.metrics["test/acc"], abs=0.03)  # same model, other kernels
    keys = [set(torch.load(r.last_checkpoint, map_location="cpu", weights_only=True)["state_dict"])
            for r in (eager, compiled)]
    assert keys[0] == keys[1]  # no _orig_mod. prefix: litlab.load and resume work as without compile


# ---------------------------------------------------------------- data and tracking paths
def test_index_batches_are_the_batch_samplers_batches():
    from torch.utils.data import DistributedSampler

    from litlab.data.memory import TensorBatchDataset, fast_loader, index_batches
    from litlab.data.resumable import ResumableBatchSampler

    ds = TensorBatchDataset(torch.arange(103).float()[:, None], torch.arange(103))
    for sampler in (fast_loader(ds, 10, shuffle=True).batch_sampler.sampler,
                    fast_loader(ds, 10, shuffle=False).batch_sampler.sampler,
                    DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(4)
        for drop_last in (False, True):
            for skip in (0, 3):
                lists, tensors = ResumableBatchSampler(sampler, 10, drop_last), ResumableBatchSampler(sampler, 10, drop_last)
                lists.skip = tensors.skip = skip
                want, got = list(lists), list(index_batches(tensors, torch.device("cpu")))
                assert [b for b in want] == [t.tolist() for t in got]
                assert [b.seed for b in want] == [t.seed for t in got]


def test_epoch_gathered_batches_are_the_per_batch_gathers():
    """One gather per epoch then slices gives the same batches, augmentation seeds and skip as a
    gather per batch (index_batches + __getitems__)."""
    from litlab.data.memory import TensorBatchDataset, fast_loader, gathered_batches, index_batches
    from litlab.data.resumable import ResumableBatchSampler

    noise = lambda x: x + torch.rand(x.shape)  # a random transform: seeded per batch  # noqa: E731
    for transform in (None, noise):
        ds = TensorBatchDataset(torch.arange(206).float().reshape(103, 2), torch.arange(103), transform)
        sampler = fast_loader(ds, 10, shuffle=True).batch_sampler.sampler
        sampler.set_epoch(2)
        for drop_last in (False, True):
            for skip in (0, 4, 11):
                per_batch, per_epoch = ResumableBatchSampler(sampler, 10, drop_last), ResumableBatchSampler(sampler, 10, drop_last)
                per_batch.skip = per_epoch.skip = skip
                want = [ds.__getitems__(idx) for idx in index_batches(per_batch, torch.device("cpu"))]
                got = list(gathered_batches(ds, per_epoch, seeds=transform is not None))
                assert len(want) == len(got) == max(0, (10 if drop_last else 11) - skip)
                assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(want, got))


def test_tensor_metrics_land_in_order_and_as_the_synchronous_ones(tmp_path):
    from litlab.tracking import MlflowTracker

    tracker = MlflowTracker(f"sqlite:///{tmp_path}/unused.db", "run", spool_dir=tmp_path)
    tracker.log_tensor_metrics({"train/loss_step": torch.tensor(0.25), "epoch": 0}, step=4)  # CPU: lands at once

    class Pending:  # a CUDA event that has not completed yet
        done = False

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    event = Pending()
    tracker._in_flight.append((["train/loss_step"], torch.tensor([0.5]), event, {"epoch": 1}, 9, 0))
    tracker._land(wait=False)
    assert len(tracker._in_flight) == 1  # not landed: nothing waits for the device
    tracker.log_metrics({"val/acc": 0.9}, step=9)  # a synchronous log lands what came before it first
    points = [tuple(p) for batch, _ in tracker.spool.unsent_batches() for p in batch]
    assert [(k, v, s) for k, v, _, s in points] == [("train/loss_step", 0.25, 4), ("epoch", 0.0, 4),
                                                    ("train/loss_step", 0.5, 9), ("epoch", 1.0, 9), ("val/acc", 0.9, 9)]
    tracker.close()
    assert tracker._worker is None  # its sender ended


# ---------------------------------------------------------------- start-up
def _best_seconds(cmd: list[str], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=cli_env(), capture_output=True, check=True, cwd=REPO)
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("args", [["--help"], ["models"]])
def test_help_and_models_answer_in_under_a_second_without_torch(args):
    probe = ("import sys\nfrom litlab.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules, file=sys.stderr)" % (args,))
    p = subprocess.run([sys.executable, "-c", probe], env=cli_env(), capture_output=True, text=True, cwd=REPO)
    assert p.stderr.strip().splitlines()[-1] == "False", p.stderr[-2000:]  # torch was never imported
    assert _best_seconds([sys.executable, "-m", "litlab", *args]) < 1.0


def test_models_index_read_from_source_equals_the_registry():
    from litlab import registry
    from litlab.model_index import registered_models

    registry.load_all()
    want = sorted((e.name, e.chapter, e.description) for e in registry.MODELS.values() if e.chapter != "user")
    assert sorted((e.name, e.chapter, e.description) for e in registered_models()) == want


# ---------------------------------------------------------------- overhead against a hand loop
def test_mlp_step_throughput_is_close_to_a_hand_written_loop(tmp_path, monkeypatch):
    """A loose bar for a shared CI machine: litlab >= 0.35 x a hand loop (best of 3, CPU time of the
    training thread; unoptimised litlab measured 0.14 on this test). benchmarks/throughput.py
    measures the real figures (wall time, more epochs)."""
    import throughput as tp

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    bench = tp.benches(smoke=False, epochs=6)["mlp"]
    cfg = runner.load_config(str(REPO / bench.source), [*bench.overrides, "trainer.accelerator=cpu"])
    rates = {"hand": [], "litlab": []}
    for _ in range(3):
        for side in rates:
            clock = tp.EpochClock(warmup_epochs=1, clock="cpu")
            if side == "hand":
                tp.hand_side(cfg, bench, clock, torch.device("cpu"), compile_net=False)
            else:
                tp.litlab_side(cfg, clock, lambda b: len(b[0]), f"sqlite:///{tmp_path}/mlflow.db")
            rates[side].append(clock.samples / clock.seconds)
    ratio = max(rates["litlab"]) / max(rates["hand"])
    print(f"litlab / hand loop: {ratio:.3f}")
    assert ratio >= 0.35, rates


@pytest.mark.parametrize("keep", ["logits", "predictions", "both"])
@pytest.mark.parametrize("fold_every, fold_elements", [(256, 1 << 22), (3, 1 << 22), (256, 100)])
def test_train_epoch_stats_are_the_reference_mean_loss_and_accuracy(fold_every, fold_elements, keep, monkeypatch):
    """TrainEpochStats (comparisons deferred and counted in groups) against torchmetrics' accuracy and
    a batch-size-weighted mean, with a short last batch and (B, K, T) logits of two lengths; keeping
    the logits (CPU), the argmax (GPU), or each in turn."""
    import itertools

    import torchmetrics

    from litlab.epoch_stats import TrainEpochStats

    if keep != "logits":
        turns = itertools.cycle([False] if keep == "predictions" else [True, False])
        monkeypatch.setattr(TrainEpochStats, "keeps_logits", staticmethod(lambda logits: next(turns)))

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(b, 5, *t, generator=g), torch.randint(0, 5, (b, *t), generator=g), torch.rand((), generator=g))
               for b, t in [(8, ()), (8, ()), (8, ()), (8, ()), (3, ())]]
    seq = [(torch.randn(4, 5, t, generator=g), torch.randint(0, 5, (4, t), generator=g), torch.rand((), generator=g))
           for t in (6, 6, 2)]
    for group in (batches, seq):
        stats = TrainEpochStats(fold_every=fold_every, fold_elements=fold_elements)
        reference = torchmetrics.classification.MulticlassAccuracy(num_classes=5, average="micro", multidim_average="global")
        for logits, target, loss in group:
            stats.add(loss, logits, target)
            reference.update(logits, target)
        mean_loss, acc = stats.epoch_values()
        expected_loss = sum(float(loss) * len(t) for _, t, loss in group) / sum(len(t) for _, t, _ in group)
        assert float(acc) == pytest.approx(float(reference.compute()), abs=1e-7)
        assert float(mean_loss) == pytest.approx(expected_loss, rel=1e-6)
        stats.reset()
        assert not stats._pending and int(stats.correct) == 0 and int(stats.samples) == 0


def test_the_loss_sum_is_the_same_bits_however_the_steps_are_folded():
    """The CPU path sums the waiting losses at each fold: float32 partial sums, one step at a time,
    so any grouping (a fold every step, every 7, one at a checkpoint mid-group) gives the same
    bits, close to torch's own float32 add_ step by step."""
    from litlab.epoch_stats import TrainEpochStats, float32_running_sum

    g = torch.Generator().manual_seed(3)
    steps = [(torch.rand((), generator=g) * 4, int(torch.randint(1, 200, (), generator=g))) for _ in range(600)]
    sums = set()
    for fold_every, fold_at in [(1, None), (7, None), (256, 100), (1000, 333)]:
        stats = TrainEpochStats(fold_every=fold_every)
        for i, (loss, batch) in enumerate(steps):
            stats.add(loss, torch.zeros(batch, 3), torch.zeros(batch, dtype=torch.long))
            if i == fold_at:
                stats.fold()  # as ExactResume does before a checkpoint
        stats.fold()
        sums.add(stats.loss_sum.item())
    assert len(sums) == 1
    reference = torch.zeros(())
    for loss, batch in steps:
        reference.add_(loss, alpha=batch)
    assert sums.pop() == pytest.approx(reference.item(), rel=1e-6)
    halves = float32_running_sum(float32_running_sum(0.0, [(1.1, 3)]), [(2.2, 5)])
    assert halves == float32_running_sum(0.0, [(1.1, 3), (2.2, 5)])


def test_a_move_to_where_the_tensors_are_returns_the_result_itself():
    """skip_needless_moves: _ResultMetric.to(its own device) is the object, unchanged; any other
    move (another device, a dtype) is still Lightning's."""
    from lightning.pytorch.trainer.connectors.logger_connector.result import _Metadata, _ResultMetric

    from litlab.lightning_speedups import _all_on, skip_needless_moves

    skip_needless_moves()
    metric = _ResultMetric(_Metadata(fx="training_step", name="x", on_epoch=True), is_tensor=True)
    metric.update(torch.tensor(2.0), 3)
    before = {k: v.clone() for k, v in metric.__dict__.items() if isinstance(v, torch.Tensor)}
    assert metric.to(torch.device("cpu")) is metric
    assert all(torch.equal(metric.__dict__[k], v) for k, v in before.items())
    assert not _all_on(metric.__dict__, torch.device("meta"))
    assert metric.to(torch.device("meta")).value.device.type == "meta"  # Lightning's own move
    assert not _all_on({"values": [torch.zeros(1)]}, torch.device("cpu"))  # could hold tensors deeper
