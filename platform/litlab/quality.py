"""Sample-quality metrics shared by the generative chapters (autoencoders, GANs, diffusion), for
8x8 digit images in [0, 1].

Inception-v3 (the "I" of FID) needs a download and 299x299 RGB inputs, so the features come from a
small CNN trained on scikit-learn's digits instead: `digits_classifier()` trains it once (seeded,
a few seconds on a CPU, >= 0.97 test accuracy) and caches the weights on disk, in $LITLAB_CACHE or
~/.cache/litlab. Then

    frechet_distance(fake, real)  Frechet distance between Gaussians fitted to the classifier's
                                  penultimate features (torchmetrics' FrechetInceptionDistance with a
                                  custom feature module): ||mu_f - mu_r||^2 + Tr(S_f + S_r - 2 (S_f S_r)^1/2)
    confidence(images)            mean max softmax probability: 0.95 on real test digits, 0.12 on
                                  uniform noise, ~0.55 on 50/50 blends of two digits (calibrated: see
                                  _train_classifier), 0.1 at the least
    class_accuracy(images, labels) fraction the classifier reads as their intended class (conditional models)
    real_digits(split, n)         (images (N, 1, 8, 8) in [0, 1], labels (N,)): the same splits as
                                  DigitsDataModule(normalize=False)
    log_quality(module, images)   all of the above -> module.log("{prefix}/fid", ...)

Every function takes images (N, 1, H, W) of any H, W (area-resized to 8x8 inside), clipped to [0, 1]:
map a tanh output in [-1, 1] with (x + 1) / 2 first. The numbers only compare models on these
digits: an "FID" here is not comparable with Inception FIDs in papers.
"""

from __future__ import annotations

import functools
import os
import pickle
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLASSIFIER_VERSION = 2  # bump when the architecture or the training recipe changes: a new cache file
NUM_FEATURES = 64
_SEED = 0
_EPOCHS = 30


class DigitsClassifier(nn.Module):
    """conv3x3(32)-conv3x3(64)-pool-conv3x3(64)-pool-fc(64)-fc(10) on 8x8 images in [0, 1].

    No batch norm and no dropout, so train and eval mode compute the same function (a LightningModule
    that holds one cannot change it by calling .train()). `features(x)` -> (N, 64) penultimate
    activations, `forward(x)` -> (N, 10) logits."""

    num_features = NUM_FEATURES  # read by torchmetrics' FID instead of a dummy forward pass

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 64, 4, 4)
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 64, 2, 2)
            nn.Flatten(), nn.Linear(256, NUM_FEATURES), nn.ReLU(),
        )
        self.head = nn.Linear(NUM_FEATURES, 10)

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        """(N, 1, H, W) or (N, H, W) -> (N, 1, 8, 8) float in [0, 1] (area interpolation = mean of each cell)."""
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected grey images (N, 1, H, W), got shape {tuple(x.shape)}")
        x = x.float().clamp(0, 1)
        if x.shape[-2:] != (8, 8):
            x = F.interpolate(x, size=(8, 8), mode="area")
        return x

    def features(self, x: Tensor) -> Tensor:
        return self.body(self.prepare(x))  # (N, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (N, 10)


class _FeatureExtractor(nn.Module):
    """What torchmetrics' FrechetInceptionDistance calls: float images in [0, 1] -> (N, 64)."""

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)


# ---- data -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _digit_splits() -> dict[str, tuple[Tensor, Tensor]]:
    from litlab.data.digits import DigitsDataModule

    dm = DigitsDataModule(normalize=False)
    dm.setup()
    return {name: ds.tensors() for name, ds in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set))}


def real_digits(split: str = "test", n: int | None = None) -> tuple[Tensor, Tensor]:
    """The digits of one split of DigitsDataModule(normalize=False) (default split_seed 0):
    (images float (N, 1, 8, 8) in [0, 1], labels int64 (N,)); the first `n` of them if given
    (the split is already shuffled, stratified). Sizes: train 1257, val 270, test 270."""
    splits = _digit_splits()
    if split not in splits:
        raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}")
    x, y = splits[split]
    if n is not None:
        x, y = x[:n], y[:n]
    return x.clone(), y.clone()


# ---- the classifier: train once, cache on disk --------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("LITLAB_CACHE") or Path.home() / ".cache" / "litlab")


def classifier_path() -> Path:
    return cache_dir() / f"digits_classifier_v{CLASSIFIER_VERSION}.pt"


def _outliers(n: int, like: Tensor) -> Tensor:
    """n images that are no digit: uniform noise, sparse salt noise and random blobs, (n, 1, 8, 8)."""
    kind = torch.randint(0, 3, (n, 1, 1, 1))
    uniform = torch.rand(n, 1, 8, 8)
    salt = (torch.rand(n, 1, 8, 8) < torch.rand(n, 1, 1, 1) * 0.5).float()
    blobs = F.interpolate(torch.rand(n, 1, 3, 3), size=(8, 8), mode="bilinear", align_corners=False)
    return torch.where(kind == 0, uniform, torch.where(kind == 1, salt, blobs)).to(like)


def _train_classifier() -> dict[str, Tensor]:
    """Adam, 30 epochs of batch 64 on the 1257 training digits shifted by up to 1 pixel; seeded,
    and inside fork_rng so the caller's random stream is the same whether or not the cache existed.

    Calibration, so that `confidence` means something for generated images: a plain classifier
    is ~80% sure that uniform noise is some digit. Each batch adds (i) 32 outliers (noise, blobs)
    with a uniform target (outlier exposure, Hendrycks et al. 2019) and (ii) 32 blends
    lam * x_i + (1 - lam) * x_j of two digits with the blended target (mixup, Zhang et al. 2018),
    lam ~ U(0.2, 0.8): a blurry average of two digits should not read as a confident digit."""
    from litlab.data.digits import RandomShift

    # Often first called from a validation hook: Lightning runs those under torch.inference_mode().
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        x, y = (t.clone() for t in real_digits("train"))  # normal tensors even if cached in inference mode
        torch.manual_seed(_SEED)
        net = DigitsClassifier()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        shift = RandomShift(1, fill=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=_EPOCHS * ((len(x) + 63) // 64))
        uniform = torch.full((1, 10), 0.1)
        for _ in range(_EPOCHS):
            for idx in torch.randperm(len(x)).split(64):
                xb, tb = shift(x[idx]), F.one_hot(y[idx], 10).float()  # (B, 1, 8, 8), (B, 10)
                other = torch.randint(0, len(x), (32,))
                lam = torch.empty(32, 1).uniform_(0.2, 0.8)
                blend = lam[:, :, None, None] * xb[:32] + (1 - lam[:, :, None, None]) * shift(x[other])
                blend_t = lam * tb[:32] + (1 - lam) * F.one_hot(y[other], 10).float()
                inputs = torch.cat([xb, blend, _outliers(32, xb)])
                targets = torch.cat([tb, blend_t, uniform.expand(32, 10)])
                loss = F.cross_entropy(net(inputs), targets)  # soft targets
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached() -> dict[str, Tensor] | None:
    path = classifier_path()
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        DigitsClassifier().load_state_dict(state)  # checks every key and shape
        return state
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError):  # truncated or foreign: retrain
        return None


_STATE: dict[str, Tensor] | None = None  # this process's copy of the weights


def _classifier_state() -> dict[str, Tensor]:
    global _STATE
    if _STATE is None:
        state = _load_cached()
        if state is None:
            state = _train_classifier()
            try:
                _atomic_save(state, classifier_path())
            except OSError:  # read-only home: keep it in memory only
                pass
        _STATE = state
    return _STATE


def digits_classifier(device: torch.device | str | None = None) -> DigitsClassifier:
    """A fresh copy of the cached digits classifier (trained on first use: a few seconds), in eval
    mode with frozen parameters (gradients still flow to its input). Input (N, 1, H, W) in [0, 1];
    output logits (N, 10); `.features(x)` -> (N, 64). Leaves the global random state untouched, as
    do all the metrics below (a model that scores its samples trains the same with or without them)."""
    state = _classifier_state()
    with torch.random.fork_rng(devices=[]):  # the layers' random init must not move the caller's RNG
        net = DigitsClassifier()
    net.load_state_dict(state)
    net.requires_grad_(False).eval()
    return net.to(device) if device is not None else net


def _classifier_for(images: Tensor) -> DigitsClassifier:
    return digits_classifier(images.device)


# ---- metrics ----------------------------------------------------------------------------------

def _batched(fn, images: Tensor, batch: int = 1024) -> Tensor:
    return torch.cat([fn(chunk) for chunk in images.split(batch)])


@torch.no_grad()
def classifier_probs(images: Tensor) -> Tensor:
    """Softmax of the digits classifier: (N, 1, H, W) in [0, 1] -> (N, 10)."""
    net = _classifier_for(images)
    return _batched(lambda x: net(x).softmax(-1), images)


def confidence(images: Tensor) -> float:
    """Mean over images of max_k p(k | image): 1 = every image reads as one clear digit, 0.1 = noise."""
    return classifier_probs(images).max(-1).values.mean().item()


def class_accuracy(images: Tensor, labels: Tensor) -> float:
    """Fraction of images the classifier assigns to `labels[i]` (for class-conditional generators)."""
    pred = classifier_probs(images).argmax(-1)
    return (pred == labels.to(pred.device)).float().mean().item()


@torch.no_grad()
def frechet_distance(fake: Tensor, real: Tensor | None = None) -> float:
    """Frechet distance between the classifier features of `fake` and `real` (default: the 270 real
    test digits), each set at least 2 images: ||mu_f - mu_r||^2 + Tr(S_f + S_r - 2 (S_f S_r)^1/2).
    Computed by torchmetrics.image.fid.FrechetInceptionDistance with the classifier as its feature
    module (normalize=True: float images in [0, 1] go to the module unchanged)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real is None:
        real = real_digits("test")[0]
    if len(fake) < 2 or len(real) < 2:
        raise ValueError(f"the Frechet distance needs at least 2 images per set, got {len(fake)} fake, {len(real)} real")
    extractor = _FeatureExtractor(_classifier_for(fake))
    metric = FrechetInceptionDistance(feature=extractor, normalize=True).to(fake.device)
    for chunk in real.to(fake.device).split(1024):
        metric.update(DigitsClassifier.prepare(chunk), real=True)
    for chunk in fake.split(1024):
        metric.update(DigitsClassifier.prepare(chunk), real=False)
    return float(metric.compute())


def quality_metrics(images: Tensor, labels: Tensor | None = None, real: Tensor | None = None) -> dict[str, float]:
    """{"fid", "sample_confidence"} (+ "sample_class_acc" when `labels` are the intended classes);
    "fid" is left out when there are fewer than 2 images."""
    images = images.detach()
    out = {"sample_confidence": confidence(images)}
    if labels is not None:
        out["sample_class_acc"] = class_accuracy(images, labels)
    if len(images) >= 2:
        out["fid"] = frechet_distance(images, real)
    return out


def log_quality(module, images: Tensor, labels: Tensor | None = None, prefix: str = "val",
                real: Tensor | None = None) -> dict[str, float]:
    """module.log(f"{prefix}/fid"), f"{prefix}/sample_confidence" and, with labels,
    f"{prefix}/sample_class_acc" for generated `images` (N, 1, H, W) in [0, 1]; returns the values.
    Call it from on_validation_epoch_end / on_test_epoch_end (values are already epoch-level)."""
    values = quality_metrics(images, labels, real)
    for name, value in values.items():
        module.log(f"{prefix}/{name}", value, on_step=False, on_epoch=True, sync_dist=False)
    return values
