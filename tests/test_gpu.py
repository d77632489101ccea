"""GPU checks (mixed precision learns as on the CPU). Skipped cleanly where there is no GPU.

Also run on a bare GPU image (benchmarks/gpu_session.sh): without mlflow there the runs are
untracked, since these tests check learning, not tracking. The most telling check runs first.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import EXPERIMENTS, MLP_DIGITS
from litlab import runner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DIGITS = [p for p in EXPERIMENTS if "digits" in p.name and "perceptron" not in p.name]
BARS = {"mlp_digits.yaml": 0.95, "lenet_digits.yaml": 0.97, "resnet_digits.yaml": 0.97}
GPU = ["trainer.accelerator=gpu", "trainer.devices=1", "tracking.system_metrics=false",
       *([] if importlib.util.find_spec("mlflow") else ["tracking.mlflow=false"])]


def test_classifier_learns_under_cuda_graphs(tracking_uri):
    """trainer.compile_mode=reduce-overhead (CUDA graphs): the graph's outputs are overwritten by
    the next replay, so nothing may keep the logits across steps (TrainEpochStats keeps the argmax)."""
    result = runner.run(MLP_DIGITS, [*GPU, "trainer.compile=true", "trainer.compile_mode=reduce-overhead",
                                     "trainer.max_epochs=3"], tracking_uri=tracking_uri)
    assert result.status == "FINISHED"
    assert result.metrics["test/acc"] >= 0.9, result.metrics


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("path", DIGITS, ids=lambda p: p.stem)
def test_digits_learn_on_gpu_with_mixed_precision(path, precision, tracking_uri):
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    result = runner.run(path, [*GPU, f"trainer.precision={precision}"], tracking_uri=tracking_uri)
    assert result.status == "FINISHED"
    assert result.metrics["test/acc"] >= BARS.get(path.name, 0.9), result.metrics
