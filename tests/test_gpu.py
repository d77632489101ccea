"""GPU checks (mixed precision learns as on the CPU). Skipped cleanly where there is no GPU.

Also run on a bare GPU image (benchmarks/gpu_session.sh): without mlflow there the runs are
untracked, since these tests check learning, not tracking. The most telling check runs first.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from helpers import DIGITS, LEARNED_DIGITS, MLP_DIGITS, REPO, smoke_benchmark_runs, unlearned
from litlab import runner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = ["trainer.accelerator=gpu", "trainer.devices=1", "tracking.system_metrics=false",
       *([] if importlib.util.find_spec("mlflow") else ["tracking.mlflow=false"])]


def test_classifier_learns_under_cuda_graphs(tracking_uri):
    """trainer.compile_mode=reduce-overhead (CUDA graphs): the graph's outputs are overwritten by
    the next replay, so nothing may keep the logits across steps (TrainEpochStats keeps the argmax)."""
    result = runner.run(MLP_DIGITS, [*GPU, "trainer.compile=true", "trainer.compile_mode=reduce-overhead",
                                     "trainer.max_epochs=3"], tracking_uri=tracking_uri)
    assert result.status == "FINISHED"
    assert result.metrics["test/acc"] >= 0.9, result.metrics


# the digits MLP, and the ResNet-18 and GPT-2 benchmarks at their smoke sizes (their code paths on a
# GPU: bf16 autocast, fused optimisers, channels_last, the data held on the device), a packed-RNN
# seq2seq (lengths kept on the host, the sort order sent over asynchronously) and the YOLO loss
# (padded target slots, no selection), BERT's fixed prediction slots, GShard's expert buffers and the
# VAE's step losses logged for the progress bar: copies a CPU cannot show
SEQ2SEQ = REPO / "experiments" / "rnn" / "seq2seq_reverse_attention.yaml"
YOLO = REPO / "experiments" / "cnn" / "yolo_shapes.yaml"
BERT_MLM = REPO / "experiments" / "transformer" / "bert_mlm_pydoc.yaml"
GPT_MOE = REPO / "experiments" / "transformer" / "gpt_moe_pydoc.yaml"
VAE = REPO / "experiments" / "autoencoder" / "vae_digits.yaml"  # self.log(on_step=True, prog_bar=True)
SAGE = REPO / "experiments" / "gnn" / "sage_sbm.yaml"  # with the LSTM aggregator: its (T, D) grid
GRAPHS = REPO / "experiments" / "gnn" / "graph_classification.yaml"  # the same, a batch of graphs at a time


@pytest.mark.parametrize("source, overrides", [
    pytest.param(str(MLP_DIGITS), [], id="mlp_digits"), *smoke_benchmark_runs(("resnet18", "gpt2")),
    pytest.param(str(SEQ2SEQ), ["data.n_train=640", "data.n_val=64", "data.n_test=64"], id="seq2seq"),
    pytest.param(str(YOLO), ["data.n_train=320", "data.n_val=32", "data.n_test=32"], id="yolo"),
    pytest.param(str(VAE), [], id="vae_digits"),
    pytest.param(str(SAGE), ["model.aggregator=lstm"], id="sage_lstm"),
    pytest.param(str(GRAPHS), ["model.conv=sage", "model.aggregator=lstm"], id="graph_classifier_sage_lstm"),
    pytest.param(str(BERT_MLM), ["data.n_train=256", "model.d_model=32", "model.n_layers=1", "model.d_ff=64"],
                 id="bert_mlm"),
    pytest.param(str(GPT_MOE), ["data.max_chars=20000", "data.seq_len=32", "model.block_size=32", "model.n_layer=2",
                                "model.d_model=32", "model.d_ff=32", "model.sample_length=20"], id="gpt_moe")])
def test_training_steps_make_no_host_sync(source, overrides, tracking_uri, monkeypatch):
    """No host synchronisation per step: torch's sync debug mode warns at each synchronising CUDA
    call (.item(), bool(), a blocking copy either way, nonzero), and each such call stalls the CPU
    until the GPU has caught up, so the next step cannot be queued behind the running one. The
    step's metrics, the NaN guard and the progress bar read the device asynchronously; only the
    epoch's edges (its index order copied over, validation) may wait. Lists the steps that did,
    with the lines that waited (tests/test_host_syncs.py checks every model the same way on a CPU)."""
    from litlab import fast_loop

    advance, per_step, lean = fast_loop.LeanTrainingEpochLoop.advance, [], []
    epochs = 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def counted_advance(self, data_fetcher):
            before, first = len(caught), self.batch_progress.current.ready == 0
            lean.append(getattr(self, "_plan", None) is not None and not self._restarting)
            try:
                return advance(self, data_fetcher)
            finally:
                syncs = [f"{w.filename}:{w.lineno}" for w in caught[before:] if "synchroniz" in str(w.message)]
                per_step.append((first, syncs))

        monkeypatch.setattr(fast_loop.LeanTrainingEpochLoop, "advance", counted_advance)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = runner.run(source, [*overrides, *GPU, "trainer.precision=bf16-mixed",
                                         f"trainer.max_epochs={epochs}"], tracking_uri=tracking_uri)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert result.status == "FINISHED"
    assert per_step and all(lean), "the lean step did not run"
    # the first batch of each epoch may wait (its index order); every other step: none
    synced = {i: msgs for i, (first, msgs) in enumerate(per_step) if msgs and not first}
    assert not synced, f"{len(synced)} of {len(per_step)} steps synchronised: {synced}"


@pytest.mark.parametrize("path", DIGITS, ids=lambda p: p.stem)  # every experiment under bf16 first
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_digits_learn_on_gpu_with_mixed_precision(path, precision, tracking_uri):
    """Each model learns under mixed precision as on the CPU: its test metrics reach the bars of
    helpers.LEARNED_DIGITS (accuracy for the classifiers, sample quality for the generators)."""
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    result = runner.run(path, [*GPU, f"trainer.precision={precision}"], tracking_uri=tracking_uri)
    assert result.status == "FINISHED", (result.status, result.metrics)
    missed = unlearned(result.metrics, LEARNED_DIGITS[path.stem])
    assert not missed, f"{path.stem} under {precision}: {', '.join(missed)}; all test metrics: {result.metrics}"
