"""No host synchronisation per training step, checked on the CPU for every registered model.

On a GPU, a call that needs a value back from the device (.item(), bool(), a boolean-mask
selection, nonzero, bincount, unique, index_put_ with accumulate=True, ...) stalls the host until
the GPU has caught up, so the next step cannot be queued behind the running one. Here a
TorchDispatchMode counts the ops that would wait there, step by step (tests/test_gpu.py checks the
same on a GPU with torch's sync debug mode). Left out: data loading (a batch is made on the host
before it is moved) and, after an epoch's last batch, Lightning's own progress-bar update (it reads
the step's values once an epoch).
The run's first step may wait (a model may check its data once); no other step may, except in the
models listed with the reason their computation needs it.
"""

from __future__ import annotations

import contextlib

import lightning as L
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from helpers import smoke_benchmark_runs
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector
from litlab import fast_loop, registry, runner
from test_registry import MODEL_NAMES, _build

A = torch.ops.aten
WAITING_OPS = {A._local_scalar_dense.default, A.nonzero.default, A.masked_select.default, A.bincount.default,
               A.repeat_interleave.Tensor, A._unique2.default, A.unique_dim.default, A.unique_consecutive.default}
MASK_INDEXED_OPS = {A.index.Tensor, A.index_put.default, A.index_put_.default, A._index_put_impl_.default}

WAITS_BY_DESIGN = {
    "perceptron": "Rosenblatt's rule updates on each mistake, one example at a time",
}


def waits_on_a_gpu(func, args) -> bool:
    if func in WAITING_OPS:
        return True
    if func in MASK_INDEXED_OPS:  # x[mask]: the selected count is read
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None):
            return True
        # index_put_(accumulate=True) on CUDA checks the indices' range by reading their max and min
        # (.item()). The backward of x[idx] skips the check (_index_put_impl_'s unsafe=True), except
        # under a dispatch mode like this one, where it takes index_put's checked path instead.
        accumulate, unsafe = (list(args[3:5]) + [False, False])[:2]
        node = torch._C._current_autograd_node()
        in_index_backward = node is not None and node.name() == "IndexBackward0"
        return bool(accumulate) and not unsafe and not in_index_backward  # x[idx] itself has no accumulate
    return False


class HostReads(TorchFunctionMode):
    """The Python-level half of WaitCounter: reads of GPU tensors to the host, and tensors made from
    Python data for the GPU (a blocking copy from the host), while the counter counts."""

    READS = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__}
    FROM_DATA = {torch.tensor, torch.as_tensor}

    def __init__(self, counter: "WaitCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        if c.counting:
            if func in self.READS and args[0] in c.on_device:
                c.wait()
            elif func is torch.Tensor.new_tensor and args[0] in c.on_device and not isinstance(args[1], torch.Tensor):
                c.wait()
            elif func in self.FROM_DATA and isinstance(kwargs.get("device"), torch.device) \
                    and not isinstance(args[0], torch.Tensor):
                c.wait()
        return func(*args, **kwargs)


class WaitCounter(TorchDispatchMode):
    """Counts, inside each lean training step but outside its batch fetch, the ops that would wait.

    Reading a tensor to Python (.cpu(), .tolist(), .numpy()) or making one from Python data for the
    device happens above the ops a TorchDispatchMode sees and costs nothing on a CPU, so `HostReads`
    counts those calls, on the tensors a GPU run would hold on the GPU: the module's parameters and
    buffers, the batch as its transfer hook moves it, and whatever is computed from them."""

    def __init__(self):
        super().__init__()
        self.counting = False
        self.steps: list[int] = []  # waits of each step
        self.host_tensors = WeakIdKeyDictionary()  # tensors that stay on the host on a GPU too
        self.on_device = WeakIdKeyDictionary()  # tensors that would be on the GPU
        self.reads = HostReads(self)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is A._pack_padded_sequence.default:  # a PackedSequence's batch_sizes: made on the host
            self.host_tensors[out[1]] = True
        elif self.counting and waits_on_a_gpu(func, args) and not self.reads_the_host(func, args):
            self.wait()
        if self.counting and any(isinstance(t, torch.Tensor) and t in self.on_device
                                 for t in tree_leaves((args, kwargs))):
            self.place(out)
        return out

    def wait(self) -> None:
        self.steps[-1] += 1

    def place(self, tree) -> None:
        """Marks the tensors of `tree` as held on the GPU."""
        for t in tree_leaves(tree):
            if isinstance(t, torch.Tensor):
                self.on_device[t] = True
            elif hasattr(t, "stores"):  # a torch_geometric Data / Batch
                self.place([dict(store) for store in t.stores])

    def place_batch(self, module, batch) -> None:
        """The batch's tensors as the module's transfer hook moves them: a hook of its own may keep
        some on the host (a meta device shows which)."""
        if type(module).transfer_batch_to_device is L.LightningModule.transfer_batch_to_device:
            return self.place(batch)
        moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
        for before, after in zip(tree_leaves(batch), tree_leaves(moved)):
            if after is not before:
                self.place(before)

    def reads_the_host(self, func, args) -> bool:
        read = args[0]._base if args[0]._base is not None else args[0]  # batch_sizes[0] is a view
        return func is A._local_scalar_dense.default and read in self.host_tensors

    def __enter__(self):
        self.reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.reads.__exit__(*exc)

    @contextlib.contextmanager
    def paused(self):
        """Nothing counted inside; the counting state before it restored after."""
        counting, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = counting

    def install(self, monkeypatch) -> None:
        advance, fetch, counter = fast_loop.LeanTrainingEpochLoop.advance, fast_loop.LeanTrainingEpochLoop._fetch, self

        def counted_advance(loop, data_fetcher):
            counter.steps.append(0)
            module = loop.trainer.lightning_module
            counter.place([*module.parameters(), *module.buffers()])
            counter.counting = True
            try:
                return advance(loop, data_fetcher)
            finally:
                counter.counting = False

        def uncounted_fetch(loop, data_fetcher):
            with counter.paused():
                batch = fetch(loop, data_fetcher)
                counter.place_batch(loop.trainer.lightning_module, batch)
                return batch

        def progress_bar_at_epoch_end(connector):
            if not connector.trainer.fit_loop.epoch_loop.done:
                return on_batch_end(connector)
            with counter.paused():
                return on_batch_end(connector)

        on_batch_end = _LoggerConnector.on_batch_end
        monkeypatch.setattr(fast_loop.LeanTrainingEpochLoop, "advance", counted_advance)
        monkeypatch.setattr(fast_loop.LeanTrainingEpochLoop, "_fetch", uncounted_fetch)
        monkeypatch.setattr(_LoggerConnector, "on_batch_end", progress_bar_at_epoch_end)

    def waiting_steps(self, also_allowed=lambda i: False) -> dict[int, int]:
        return {i: n for i, n in enumerate(self.steps) if n and i > 0 and not also_allowed(i)}


def test_the_reasons_name_registered_models():
    assert set(WAITS_BY_DESIGN) <= set(registry.MODELS)


def count_waits(name: str, tmp_path, monkeypatch, **model_overrides) -> WaitCounter:
    entry, dm, model = _build(name, **model_overrides)
    # logging steps among them (2, 4, 6): Lightning gathers the step's logged values there, even
    # with no logger, and turned each prog_bar one into a number (a sync) before litlab's loop
    trainer = L.Trainer(max_steps=6, limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        log_every_n_steps=2, default_root_dir=tmp_path)
    counter = WaitCounter()
    counter.install(monkeypatch)  # first: the lean loop keeps the logger connector's on_batch_end
    assert fast_loop.install(trainer)
    with counter:
        trainer.fit(model, datamodule=dm)
    assert len(counter.steps) >= 3  # max_steps counts optimiser steps: a GAN takes two a batch
    return counter


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in WAITS_BY_DESIGN])
def test_a_training_step_waits_for_nothing(name, tmp_path, monkeypatch):
    counter = count_waits(name, tmp_path, monkeypatch)
    assert not counter.waiting_steps(), f"{name}: steps that would wait on a GPU (step: ops) {counter.waiting_steps()}"


@pytest.mark.parametrize("name, model_overrides", [
    ("graphsage", {"aggregator": "lstm"}), ("graph_classifier", {"conv": "sage", "aggregator": "lstm"})])
def test_graphsage_lstm_steps_wait_for_nothing(name, model_overrides, tmp_path, monkeypatch):
    """The LSTM aggregator takes the neighbourhoods' (T, D) grid the data made on the host (the
    full graph, a sampled batch, a batch of graphs), not the sizes read from the device."""
    counter = count_waits(name, tmp_path, monkeypatch, **model_overrides)
    assert not counter.waiting_steps(), f"{name}: steps that would wait on a GPU (step: ops) {counter.waiting_steps()}"


@pytest.mark.parametrize("name", sorted(WAITS_BY_DESIGN))
def test_the_models_listed_as_waiting_do_wait(name, tmp_path, monkeypatch):
    """A model that no longer waits leaves the list (and is checked like the others)."""
    assert count_waits(name, tmp_path, monkeypatch).waiting_steps(), f"{name} waits for nothing now"


@pytest.mark.slow
@pytest.mark.parametrize("source, overrides", smoke_benchmark_runs())
def test_a_tracked_run_waits_only_at_its_logging_steps(source, overrides, tracking_uri, monkeypatch):
    """runner.run with its defaults (MLflow tracking, NaN guard, checkpoints, exact-resume state,
    progress output) on each benchmark's model and data: the step metrics and the NaN guard are
    read every log_every_n_steps steps (asynchronously on a GPU), no other step reads anything."""
    counter = WaitCounter()
    counter.install(monkeypatch)
    with counter:
        result = runner.run(source, [*overrides, "trainer.max_epochs=3", "trainer.log_every_n_steps=10",
                                     "tracking.system_metrics=false"], tracking_uri=tracking_uri)
    assert result.status == "FINISHED" and len(counter.steps) >= 10, len(counter.steps)
    assert not counter.waiting_steps(lambda i: (i + 1) % 10 == 0), counter.waiting_steps()


def test_device_mean_is_torchmetrics_mean():
    """DeviceMean (no NaN check, so no read per update) computes MeanMetric's weighted mean."""
    from torchmetrics import MeanMetric

    from litlab.epoch_stats import DeviceMean

    torch.manual_seed(0)
    ours, reference = DeviceMean(), MeanMetric()
    for value, weight in [(torch.rand(5), 1.0), (torch.rand(()), 7), (torch.rand(4) > 0.5, torch.rand(4)),
                          (torch.rand(3, 2), torch.rand(2)), (0.25, 3.0)]:
        ours.update(value, weight=weight)
        reference.update(torch.as_tensor(value, dtype=torch.float32), weight=weight)
    torch.testing.assert_close(ours.compute(), reference.compute())


def test_logged_numbers_are_made_on_the_device_as_lightning_makes_them():
    """log_numbers_without_copies fills a logged Python number into a 0-dim tensor on the module's
    device (no host-to-device copy) with the value and dtype Lightning's torch.tensor gives it."""
    from litlab.lightning_speedups import log_numbers_without_copies

    module = L.LightningModule()
    log_numbers_without_copies()
    ours = L.LightningModule._LightningModule__to_tensor  # what module.log calls
    assert getattr(ours, "_litlab", False)
    for default in (torch.float32, torch.float64):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            for value in (0.1, 3, True, -2.5e-8, float("inf")):
                mine = ours(module, value, "x")
                reference = torch.tensor(value, dtype=default).squeeze()
                assert mine.dtype == reference.dtype and mine.shape == reference.shape == ()
                assert torch.equal(mine, reference), (value, mine, reference)
        finally:
            torch.set_default_dtype(previous)
    tensor = torch.tensor([2.0])
    assert torch.equal(ours(module, tensor, "x"), tensor.squeeze())  # tensors: Lightning's clone


class LogsALossOnStep(L.Callback):
    """self.log(..., on_step=True, on_epoch=True, prog_bar=True), as YOLO, the autoencoders and the
    GANs log their training losses."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.log("seen/loss", outputs["loss"], on_step=True, on_epoch=True, prog_bar=True)


def test_values_logged_on_step_reach_the_tracker_as_tensors(tracking_uri, monkeypatch):
    """At a logging step the values a module logs on_step go to MlflowTracker.log_tensor_metrics as
    the tensors themselves (copied to the host asynchronously on a GPU), never through Lightning's
    conversion to numbers (a host sync per value) into log_metrics; and MLflow gets each at its step
    (tests/test_performance.py compares the values with Lightning's own loop)."""
    from mlflow import MlflowClient

    from helpers import MLP_DIGITS
    from litlab.tracking import MlflowTracker

    sent, as_numbers = [], []
    log_tensor_metrics, log_metrics = MlflowTracker.log_tensor_metrics, MlflowTracker.log_metrics

    def spy_tensors(self, metrics, step):
        if "seen/loss_step" in metrics:
            sent.append((step, type(metrics["seen/loss_step"]), metrics["epoch"]))
        return log_tensor_metrics(self, metrics, step)

    def spy_numbers(self, metrics, step=None):
        as_numbers.extend(k for k in metrics if k.endswith("_step"))
        return log_metrics(self, metrics, step)

    monkeypatch.setattr(MlflowTracker, "log_tensor_metrics", spy_tensors)
    monkeypatch.setattr(MlflowTracker, "log_metrics", spy_numbers)
    result = runner.run(MLP_DIGITS, ["model.hidden=[16]", "data.batch_size=50", "trainer.max_epochs=2",
                                     "trainer.log_every_n_steps=4", "tracking.system_metrics=false"],
                        tracking_uri=tracking_uri, callbacks=[LogsALossOnStep()], quiet=True)
    assert result.status == "FINISHED"
    assert len(sent) >= 5 and all(kind is torch.Tensor for _, kind, _ in sent), sent
    assert {epoch for _, _, epoch in sent} == {0, 1}
    assert not as_numbers, as_numbers
    history = MlflowClient(tracking_uri=tracking_uri).get_metric_history(result.run_id, "seen/loss_step")
    assert sorted(m.step for m in history) == [step for step, _, _ in sent]
