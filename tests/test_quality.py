"""litlab.quality: the digits classifier, its Frechet distance (checked against a numpy/scipy closed
form), confidence and class accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from litlab import quality


@pytest.fixture(scope="module")
def test_digits():
    return quality.real_digits("test")


def test_real_digits_match_the_data_module():
    from litlab.data.digits import DigitsDataModule

    dm = DigitsDataModule(normalize=False)
    dm.setup()
    for split, ds in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set)):
        x, y = quality.real_digits(split)
        ref_x, ref_y = ds.tensors()
        assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    x, y = quality.real_digits("test", n=10)
    assert x.shape == (10, 1, 8, 8) and y.shape == (10,) and 0 <= x.min() and x.max() <= 1
    with pytest.raises(ValueError):
        quality.real_digits("nope")


def test_classifier_accuracy_shapes_and_frozen(test_digits):
    x, y = test_digits
    net = quality.digits_classifier()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    logits = net(x)
    assert logits.shape == (len(x), 10) and net.features(x).shape == (len(x), quality.NUM_FEATURES)
    acc = (logits.argmax(-1) == y).float().mean().item()
    assert acc >= 0.97, acc
    assert quality.class_accuracy(x, y) == pytest.approx(acc)
    # Any size: area interpolation back to 8x8. Nearest upsampling by 4 is undone exactly.
    big = F.interpolate(x, scale_factor=4, mode="nearest")  # (N, 1, 32, 32)
    assert torch.allclose(net(big), logits, atol=1e-5)
    # Gradients still reach the input (a GAN could use it as a critic).
    xg = x[:4].clone().requires_grad_(True)
    net(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_cache_file_is_loaded_with_weights_only():
    quality.digits_classifier()
    path = quality.classifier_path()
    assert path.exists() and f"v{quality.CLASSIFIER_VERSION}" in path.name
    state = torch.load(path, weights_only=True)
    net = quality.digits_classifier()
    for k, v in net.state_dict().items():
        assert torch.equal(state[k], v)


def test_corrupt_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("LITLAB_CACHE", str(tmp_path))
    assert quality.classifier_path().parent == tmp_path
    assert quality._load_cached() is None  # missing
    quality.classifier_path().write_bytes(b"not a checkpoint")
    assert quality._load_cached() is None  # unreadable: retrained by the caller
    quality._atomic_save({"x": torch.ones(2)}, quality.classifier_path())
    assert quality._load_cached() is None  # readable, but not this architecture
    assert [p.name for p in tmp_path.iterdir()] == [quality.classifier_path().name]  # no temp files left


def test_training_is_seeded_and_leaves_the_callers_rng_alone(monkeypatch):
    monkeypatch.setattr(quality, "_EPOCHS", 1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = quality._train_classifier()
    assert torch.equal(torch.get_rng_state(), before)
    b = quality._train_classifier()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_first_use_inside_inference_mode(tmp_path, monkeypatch):
    """Lightning's validation hooks run under torch.inference_mode(): a first call from there must
    still train (and cache) the classifier, and the result must work outside it too."""
    monkeypatch.setenv("LITLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(quality, "_EPOCHS", 1)
    monkeypatch.setattr(quality, "_STATE", None)
    quality._digit_splits.cache_clear()  # the data too is first loaded in inference mode
    try:
        with torch.inference_mode():
            x, y = quality.real_digits("val")
            quality.class_accuracy(x, y)
        assert quality.classifier_path().exists()
        cached = torch.load(quality.classifier_path(), weights_only=True)
        fresh = quality._train_classifier()  # the same recipe, outside inference mode
        assert all(torch.equal(cached[k], fresh[k]) for k in fresh)
        x, _ = quality.real_digits("val", n=4)
        x.requires_grad_(True)
        quality.digits_classifier()(x).sum().backward()
        assert x.grad is not None
    finally:
        quality._digit_splits.cache_clear()


def test_metrics_leave_the_global_rng_alone(test_digits):
    x, y = test_digits
    quality.digits_classifier()  # trained or loaded before the check
    before = torch.get_rng_state()
    quality.digits_classifier()
    quality.log_quality(type("M", (), {"log": lambda *a, **k: None})(), x, labels=y)
    assert torch.equal(torch.get_rng_state(), before)


def test_confidence_separates_digits_from_noise(test_digits):
    x, y = test_digits
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(500, 1, 8, 8, generator=g)
    assert quality.confidence(x) > 0.85
    assert quality.confidence(noise) < 0.3
    shuffled = y[torch.randperm(len(y), generator=g)]
    assert quality.class_accuracy(x, shuffled) < 0.3


def _reference_fd(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), the closed form, with scipy's matrix root."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # ReLU units that never fire: rank-deficient covariances
def test_frechet_distance_matches_closed_form_and_ranks_sets(test_digits):
    x, _ = test_digits
    train, _ = quality.real_digits("train")
    val, _ = quality.real_digits("val")
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(300, 1, 8, 8, generator=g)
    blurred = F.avg_pool2d(val, 3, stride=1, padding=1)

    net = quality.digits_classifier()
    feats = {name: net.features(t).double().numpy() for name, t in
             (("test", x), ("train", train), ("noise", noise), ("blurred", blurred))}
    fd_train = quality.frechet_distance(train, x)
    fd_noise = quality.frechet_distance(noise, x)
    fd_blur = quality.frechet_distance(blurred, x)
    assert fd_train == pytest.approx(_reference_fd(feats["train"], feats["test"]), rel=1e-3, abs=1e-2)
    assert fd_noise == pytest.approx(_reference_fd(feats["noise"], feats["test"]), rel=1e-3)
    assert fd_blur == pytest.approx(_reference_fd(feats["blurred"], feats["test"]), rel=1e-3)

    # Two disjoint sets of real digits are close; degraded digits farther; noise farthest.
    fd_halves = quality.frechet_distance(train[:600], train[600:])
    assert fd_halves < 0.05 * fd_noise and fd_train < 0.05 * fd_noise
    assert fd_train < fd_blur < fd_noise
    assert quality.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-2)
    assert quality.frechet_distance(val) == pytest.approx(quality.frechet_distance(val, x))  # default real set
    with pytest.raises(ValueError):
        quality.frechet_distance(x[:1], x)


def test_log_quality_logs_epoch_metrics(test_digits):
    x, y = test_digits

    class Recorder:
        def __init__(self):
            self.logged = {}

        def log(self, name, value, **kwargs):
            self.logged[name] = value

    rec = Recorder()
    values = quality.log_quality(rec, x[:100], labels=y[:100], prefix="test")
    assert set(rec.logged) == {"test/fid", "test/sample_confidence", "test/sample_class_acc"}
    assert values["sample_class_acc"] >= 0.95 and values["fid"] == rec.logged["test/fid"]
    rec = Recorder()
    quality.log_quality(rec, x[:1])  # one sample: no Frechet distance, still the confidence
    assert set(rec.logged) == {"val/sample_confidence"}
