"""No host synchronisation per training step, checked on the CPU for every registered model.

On a GPU, a call that needs a value back from the device (.item(), bool(), a boolean-mask
selection, nonzero, bincount, unique, ...) stalls the host until the GPU has caught up, so the next
step cannot be queued behind the running one. Here a TorchDispatchMode counts the ops that would
wait there, step by step (tests/test_gpu.py checks the same on a GPU with torch's sync debug
mode). Data loading is left out (a batch is made on the host before it is moved). The first batch
of an epoch (its index order, caches filled) and its last (the progress bar's values as Lightning
leaves them) may wait; no other step may, except in the models listed with the reason their
computation needs it.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from helpers import smoke_benchmark_runs
from litlab import fast_loop, registry, runner
from test_registry import MODEL_NAMES, _build

A = torch.ops.aten
WAITING_OPS = {A._local_scalar_dense.default, A.nonzero.default, A.masked_select.default, A.bincount.default,
               A.repeat_interleave.Tensor, A._unique2.default, A.unique_dim.default, A.unique_consecutive.default}
MASK_INDEXED_OPS = {A.index.Tensor, A.index_put.default, A.index_put_.default, A._index_put_impl_.default}

WAITS_BY_DESIGN = {
    "bert_mlm": "the MLM head scores only the masked positions: their count is read",
    "gpt_moe": "tokens are dispatched to the experts in groups whose sizes are read",
    "graphsage": "the LSTM aggregator packs neighbourhoods by their lengths, read on the host",
    "perceptron": "Rosenblatt's rule updates on each mistake, one example at a time",
}


def waits_on_a_gpu(func, args) -> bool:
    if func in WAITING_OPS:
        return True
    if func in MASK_INDEXED_OPS:  # x[mask]: the selected count is read
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None)
    return False


class WaitCounter(TorchDispatchMode):
    """Counts, inside each lean training step but outside its batch fetch, the ops that would wait."""

    def __init__(self):
        super().__init__()
        self.counting = False
        self.steps: list[list] = []  # [first of its epoch, last of its epoch, waits]
        self.host_tensors = WeakIdKeyDictionary()  # tensors that stay on the host on a GPU too

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is A._pack_padded_sequence.default:  # a PackedSequence's batch_sizes: made on the host
            self.host_tensors[out[1]] = True
        elif self.counting and waits_on_a_gpu(func, args) and not self.reads_the_host(func, args):
            self.steps[-1][2] += 1
        return out

    def reads_the_host(self, func, args) -> bool:
        read = args[0]._base if args[0]._base is not None else args[0]  # batch_sizes[0] is a view
        return func is A._local_scalar_dense.default and read in self.host_tensors

    def install(self, monkeypatch) -> None:
        advance, fetch, counter = fast_loop.LeanTrainingEpochLoop.advance, fast_loop.LeanTrainingEpochLoop._fetch, self

        def counted_advance(loop, data_fetcher):
            counter.steps.append([loop.batch_progress.current.ready == 0, False, 0])
            counter.counting = True
            try:
                return advance(loop, data_fetcher)
            finally:
                counter.counting = False
                counter.steps[-1][1] = loop.done

        def uncounted_fetch(loop, data_fetcher):
            counter.counting = False
            try:
                return fetch(loop, data_fetcher)
            finally:
                counter.counting = True

        monkeypatch.setattr(fast_loop.LeanTrainingEpochLoop, "advance", counted_advance)
        monkeypatch.setattr(fast_loop.LeanTrainingEpochLoop, "_fetch", uncounted_fetch)

    def waiting_steps(self, also_allowed=lambda i: False) -> dict[int, int]:
        return {i: n for i, (first, last, n) in enumerate(self.steps) if n and not (first or last or also_allowed(i))}


def test_the_reasons_name_registered_models():
    assert set(WAITS_BY_DESIGN) <= set(registry.MODELS)


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in WAITS_BY_DESIGN])
def test_a_training_step_waits_for_nothing(name, tmp_path, monkeypatch):
    entry, dm, model = _build(name)
    trainer = L.Trainer(max_steps=6, limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        log_every_n_steps=50, default_root_dir=tmp_path)
    assert fast_loop.install(trainer)
    counter = WaitCounter()
    counter.install(monkeypatch)
    with counter:
        trainer.fit(model, datamodule=dm)
    assert len(counter.steps) >= 3
    assert not counter.waiting_steps(), f"{name}: steps that would wait on a GPU (step: ops) {counter.waiting_steps()}"


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
