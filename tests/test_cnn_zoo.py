"""Chapter 3 model zoo (AlexNet, VGG, ResNet-18/34/50, MobileNet-v1), the maths behind convolutions
(parameter counts, translation equivariance, the cost of depthwise separable convs), the batch
augmentations and the CIFAR-10 DataModule on a tiny fake CIFAR written here (nothing downloads)."""

from __future__ import annotations

import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from litlab import config, registry
from litlab.chapters.cnn.module import (
    AlexNetClassifier,
    MobileNetClassifier,
    ResNetClassifier,
    VGGClassifier,
)
from litlab.chapters.cnn.zoo import (
    VGG,
    VGG_STAGES,
    VGG_WIDTHS,
    AlexNet,
    DepthwiseSeparable,
    MobileNetV1,
    count_macs,
)
from litlab.data.augment import Compose, RandomCrop, RandomHorizontalFlip
from litlab.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule
from litlab.errors import ConfigError
from torch import nn

REPO = Path(__file__).resolve().parents[1]
NEW_MODELS = ("alexnet", "vgg", "resnet", "mobilenet")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def convs(m: nn.Module) -> list[nn.Conv2d]:
    return [c for c in m.modules() if isinstance(c, nn.Conv2d)]


# ---------------------------------------------------------------- convolution maths
@pytest.mark.parametrize("c_in,c_out,f", [(1, 1, 1), (1, 6, 5), (3, 64, 11), (16, 32, 3), (64, 256, 1), (7, 5, 4)])
def test_conv_parameter_count_formula(c_in, c_out, f):
    """C_out kernels of C_in x f x f weights + one bias per output channel."""
    assert n_params(nn.Conv2d(c_in, c_out, f)) == c_out * c_in * f**2 + c_out


def test_every_conv_of_the_zoo_matches_the_formula():
    nets = [AlexNet(1, 10, (32, 32), stem="small", width=0.25, hidden=8), VGG([1, 2], [8, 16], 1, 10, (8, 8)),
            MobileNetV1(3, 10, alpha=0.25)]
    cs = [c for net in nets for c in convs(net)]
    assert len(cs) > 30 and any(c.groups > 1 for c in cs)
    for c in cs:
        (kh, kw), bias = c.kernel_size, (c.out_channels if c.bias is not None else 0)
        # grouped (depthwise) conv: each output channel sees C_in / groups input channels
        assert n_params(c) == c.out_channels * (c.in_channels // c.groups) * kh * kw + bias
        ref = nn.Conv2d(c.in_channels, c.out_channels, (kh, kw), groups=c.groups, bias=c.bias is not None)
        assert n_params(c) == n_params(ref)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Move the content of (B, C, H, W) by (dy, dx), zeros entering at the border."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = x[..., max(-dy, 0):h - max(dy, 0),
                                                                       max(-dx, 0):w - max(dx, 0)]
    return out


@pytest.mark.parametrize("dy,dx", [(1, 0), (0, -2), (3, 2), (-2, -3)])
@pytest.mark.parametrize("f", [3, 5])
def test_conv_translation_equivariance_away_from_borders(dy, dx, f):
    """conv(shift(x)) = shift(conv(x)) wherever neither side saw the padding or the border."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, f, padding=f // 2)
    x = torch.randn(3, 2, 20, 20)
    with torch.no_grad():
        a, b = conv(_shift(x, dy, dx)), _shift(conv(x), dy, dx)
    m = f // 2 + max(abs(dy), abs(dx))  # border band touched by the zero padding or the shift
    torch.testing.assert_close(a[..., m:-m, m:-m], b[..., m:-m, m:-m])
    assert not torch.allclose(a, b)  # at the border it is not equivariant


@pytest.mark.parametrize("dy,dx", [(1, 0), (5, -7), (-3, 11)])
def test_circular_conv_is_exactly_translation_equivariant(dy, dx):
    """With circular padding the image is a torus: conv(roll(x)) = roll(conv(x)) everywhere, and a
    global average pool on top is translation invariant."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = conv(torch.roll(x, (dy, dx), dims=(-2, -1)))
        b = torch.roll(conv(x), (dy, dx), dims=(-2, -1))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.mean((-2, -1)), conv(x).detach().mean((-2, -1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c_in,c_out,f,stride,size", [(8, 16, 3, 1, 8), (32, 64, 3, 2, 16), (16, 16, 5, 1, 7),
                                                      (3, 100, 3, 2, 9)])
def test_depthwise_separable_cost_ratio(c_in, c_out, f, stride, size):
    """MACs of depthwise f x f + pointwise 1x1 over a standard f x f conv = 1/C_out + 1/f^2
    (Howard et al. 2017, eq. 5), counted by forward hooks on the layers."""
    sep = DepthwiseSeparable(c_in, c_out, stride, kernel=f)
    std = nn.Conv2d(c_in, c_out, f, stride=stride, padding=f // 2, bias=False)
    macs_sep, macs_std = sum(count_macs(sep, (c_in, size, size)).values()), count_macs(std, (c_in, size, size))[""]
    out = (size + 2 * (f // 2) - f) // stride + 1
    assert macs_std == out * out * c_out * c_in * f * f  # D_F^2 N M D_K^2
    assert macs_sep == out * out * c_in * f * f + out * out * c_in * c_out  # D_F^2 M D_K^2 + D_F^2 M N
    assert Fraction(macs_sep, macs_std) == Fraction(1, c_out) + Fraction(1, f * f)
    assert sep.depthwise.groups == c_in and sep.pointwise.kernel_size == (1, 1)


def test_mobilenet_cost_matches_the_paper():
    """1.0 MobileNet-224: 4.2M parameters and 569M multiply-adds (Howard et al. 2017, table 8); the
    parameters are Keras' (4,231,976 trainable); 0.25 MobileNet-224: 0.47M and 41M (table 6)."""
    with torch.device("meta"):
        assert n_params(MobileNetV1(alpha=1.0)) == 4_231_976
    assert round(sum(count_macs(MobileNetV1(alpha=1.0), (3, 224, 224)).values()) / 1e6) == 569
    small = MobileNetV1(alpha=0.25)
    assert round(n_params(small) / 1e4) == 47 and round(sum(count_macs(small, (3, 224, 224)).values()) / 1e6) == 41


# ---------------------------------------------------------------- the zoo: shapes and counts
SHAPE_CASES = [
    (AlexNetClassifier, {"width": 0.125, "hidden": 32}, (1, 24, 24)),
    (AlexNetClassifier, {"width": 0.125, "hidden": 32, "head": "gap", "pool": "avg", "lrn": True}, (3, 32, 32)),
    (AlexNetClassifier, {"width": 0.125, "hidden": 32, "stem": "imagenet"}, (3, 224, 224)),
    (AlexNetClassifier, {"width": 0.125, "hidden": 32, "stem": "imagenet"}, (3, 100, 80)),
    (VGGClassifier, {"depth": 11, "width": 0.0625, "batch_norm": True}, (3, 32, 32)),
    (VGGClassifier, {"depth": 19, "width": 0.0625, "head": "gap", "pool": "avg"}, (1, 40, 48)),
    (VGGClassifier, {"stages": [1, 2, 1], "widths": [4, 8, 8], "hidden": 16}, (1, 8, 8)),
    (ResNetClassifier, {"depth": 18, "width": 0.0625}, (1, 8, 8)),
    (ResNetClassifier, {"depth": 34, "width": 0.0625, "pool": "max"}, (3, 32, 32)),
    (ResNetClassifier, {"depth": 50, "width": 0.0625, "stem": "imagenet"}, (3, 64, 64)),
    (MobileNetClassifier, {"alpha": 0.125}, (1, 8, 8)),
    (MobileNetClassifier, {"alpha": 0.125, "shallow": True, "pool": "max"}, (3, 32, 32)),
    (MobileNetClassifier, {"alpha": 0.125, "schedule": "imagenet"}, (3, 64, 64)),
]


@pytest.mark.parametrize("cls,args,shape", SHAPE_CASES, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_every_model_output_shape(cls, args, shape):
    model = cls(input_shape=shape, num_classes=7, **args).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_feature_maps_through_the_stages():
    vgg = VGG([1, 1, 2, 2, 2], [8, 16, 32, 64, 64], 3, 10, (32, 32))
    pools = [i for i, m in enumerate(vgg.features) if isinstance(m, nn.MaxPool2d)]
    x, shapes = torch.randn(1, 3, 32, 32), []
    for i, layer in enumerate(vgg.features):
        x = layer(x)
        if i in pools:
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2), (64, 1, 1)]
    mob = MobileNetV1(1, 10, alpha=0.25, schedule="cifar")
    assert mob.features(torch.randn(1, 1, 32, 32)).shape == (1, 256, 2, 2)  # 16x downsampling
    alex = AlexNet(1, 10, (32, 32), stem="small", width=0.25)
    assert alex.features(torch.randn(1, 1, 32, 32)).shape == (1, 64, 3, 3)  # 32 -> 15 -> 7 -> 3


@pytest.mark.parametrize("depth", [11, 13, 16, 19])
def test_vgg_depth_presets_count_conv_layers(depth):
    """VGG-d has d - 3 convs (and 3 fully connected layers) in stages of [1,1,2,2,2] ... [2,2,4,4,4]."""
    with torch.device("meta"):
        model = VGGClassifier(input_shape=(3, 32, 32), num_classes=10, depth=depth)
    cs = convs(model)
    assert len(cs) == depth - 3 and all(c.kernel_size == (3, 3) for c in cs)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5 == len(VGG_STAGES[depth])
    assert sorted({c.out_channels for c in cs}) == [64, 128, 256, 512]


def test_vgg_and_alexnet_imagenet_counts_match_torchvision():
    with torch.device("meta"):
        assert n_params(VGG(VGG_STAGES[11], VGG_WIDTHS, 3, 1000, (224, 224), hidden=4096)) == 132_863_336
        assert n_params(VGG(VGG_STAGES[16], VGG_WIDTHS, 3, 1000, (224, 224), hidden=4096)) == 138_357_544
        assert n_params(AlexNet(3, 1000, (224, 224), stem="imagenet", hidden=4096)) == 61_100_840


@pytest.mark.parametrize("depth,count", [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032)])
def test_resnet_depths_match_torchvision(depth, count):
    with torch.device("meta"):
        model = ResNetClassifier(input_shape=(3, 224, 224), num_classes=1000, depth=depth, stem="imagenet")
    assert n_params(model) == count
    # depth = weighted layers on the main path: stem conv + block convs + the linear layer
    main_path = [n for n, c in model.named_modules() if isinstance(c, nn.Conv2d) and ".shortcut." not in n]
    assert len(main_path) + 1 == depth


def test_width_multipliers_scale_the_channels():
    half = ResNetClassifier(input_shape=(1, 8, 8), num_classes=10, depth=18, width=0.5)
    assert [s[0].out_channels for s in half.net.stages] == [32, 64, 128, 256]
    mob = MobileNetClassifier(input_shape=(1, 8, 8), num_classes=10, alpha=0.25)
    assert mob.net.out_channels == 256 and convs(mob)[0].out_channels == 8
    vgg = VGGClassifier(input_shape=(1, 32, 32), num_classes=10, depth=11, width=0.125)
    assert [c.out_channels for c in convs(vgg)] == [8, 16, 32, 32, 64, 64, 64, 64]


def test_config_errors():
    with pytest.raises(ConfigError, match="model.stages"):
        VGGClassifier(input_shape=(1, 32, 32), num_classes=10, depth=11, stages=[1, 1])
    with pytest.raises(ConfigError, match="model.widths"):
        VGGClassifier(input_shape=(1, 32, 32), num_classes=10, stages=[1, 1], widths=[8])
    with pytest.raises(ConfigError, match=r"model.input_shape.*data.image_size"):
        VGGClassifier(input_shape=(1, 8, 8), num_classes=10, depth=11)  # 5 pools on 8x8
    with pytest.raises(ConfigError, match="model.input_shape"):
        AlexNetClassifier(input_shape=(1, 8, 8), num_classes=10)


def _data_info(cls, args):
    return cls(**args).info()


def test_registered_and_experiment_yamls_validate():
    for name in NEW_MODELS:
        entry = registry.get_model(name)
        assert entry.chapter == "3 Convolutional networks" and entry.description
        yamls = sorted((REPO / "experiments/cnn").glob(f"{name}_*.yaml"))
        assert yamls, f"no experiments/cnn/{name}_*.yaml"
        for path in yamls:
            cfg = config.load(path, data_info=_data_info)
            if cfg.model["name"] != name:
                continue  # resnet_digits.yaml is resnet_small's
            assert cfg.model["input_shape"][1] == cfg.data.get("image_size", 8)
            assert cfg.callbacks.checkpoint.monitor == "val/acc"


# ---------------------------------------------------------------- batch augmentations
def test_random_crop_is_a_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6).repeat(100, 1, 1, 1)  # (200, 3, 5, 6)
    out = RandomCrop(None, padding=2, fill=(-1.0, -2.0, -3.0), generator=g)(x)
    assert out.shape == x.shape
    padded = torch.stack([F.pad(x[:, c], (2, 2, 2, 2), value=-1.0 - c) for c in range(3)], 1)  # (200, 3, 9, 10)
    offsets = set()
    for i in range(len(x)):
        hits = [(t, l) for t in range(5) for l in range(5) if torch.equal(out[i], padded[i, :, t:t + 5, l:l + 6])]
        assert hits, f"image {i} is no window of its padded image"
        offsets.add(hits[0])
    assert len(offsets) == 25  # every shift in [-2, 2]^2 occurs
    small = RandomCrop(3, padding=0, generator=g)(x)
    assert small.shape == (200, 3, 3, 3)


def test_augmentations_deterministic_under_a_generator_and_work_on_uint8():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)

    def aug(seed):
        g = torch.Generator().manual_seed(seed)
        return Compose([RandomCrop(8, padding=2, generator=g), RandomHorizontalFlip(0.5, generator=g)])

    a, b, c = aug(0)(x), aug(0)(x), aug(1)(x)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    reflect = RandomCrop(8, padding=2, padding_mode="reflect", generator=torch.Generator().manual_seed(0))(x.float())
    assert reflect.shape == x.shape


def test_horizontal_flip():
    x = torch.randn(400, 2, 4, 5)
    assert torch.equal(RandomHorizontalFlip(0.0)(x), x)
    assert torch.equal(RandomHorizontalFlip(1.0)(x), x.flip(-1))
    out = RandomHorizontalFlip(0.5, generator=torch.Generator().manual_seed(0))(x)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert torch.equal(flipped | (out == x).flatten(1).all(1), torch.ones(400, dtype=torch.bool))
    assert 0.4 < flipped.float().mean() < 0.6


# ---------------------------------------------------------------- CIFAR-10 on a fake local copy
@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    """train-00000.parquet (100 images) and test-00000.parquet (20): 3x32x32 PIL images in CIFAR's
    `img`/`label` columns, ClassLabel with the CIFAR names."""
    import datasets
    from litlab.data.cifar import CIFAR10_CLASSES
    from PIL import Image

    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CIFAR10_CLASSES))})
    for split, n in (("train", 100), ("test", 20)):
        imgs = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        datasets.Dataset.from_dict({"img": imgs, "label": [i % 10 for i in range(n)]},
                                   features=features).to_parquet(str(root / f"{split}-00000.parquet"))
    return root


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_cache")


def _cifar(path, **kw):
    dm = CIFAR10DataModule(path=str(path), batch_size=16, **kw)
    dm.setup("fit")
    return dm


def test_cifar_registered_with_cifar_defaults():
    entry = registry.get_data("cifar10")
    assert entry.cls is CIFAR10DataModule
    args = config.resolve_args("data", entry.cls, {})
    assert args["path"] == "cifar10" and args["normalize"] == "cifar10"
    assert args["augment"] and args["crop_padding"] == 4 and args["flip"]


def test_cifar_shapes_splits_and_normalisation(fake_cifar):
    dm = _cifar(fake_cifar, augment=False)
    assert dm.info() == {"input_shape": (3, 32, 32), "num_classes": 10}
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [90, 10, 20]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = dm.val_set.x  # uint8 (N, 3, 32, 32)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(dm.val_set.tensors()[0], (raw.float() / 255 - mean) / std)
    own = _cifar(fake_cifar, augment=False, normalize="train").train_set.tensors()[0]
    torch.testing.assert_close(own.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(own.std((0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)
    plain = _cifar(fake_cifar, augment=False, normalize="none").test_set.tensors()[0]
    assert plain.min() >= 0 and plain.max() <= 1


def test_cifar_augments_training_batches_only(fake_cifar):
    plain, aug = _cifar(fake_cifar, augment=False), _cifar(fake_cifar)
    for split in ("val_set", "test_set"):
        assert torch.equal(getattr(aug, split).tensors()[0], getattr(plain, split).tensors()[0])
    torch.manual_seed(0)
    xa, ya = aug.train_set.tensors()
    xp, yp = plain.train_set.tensors()
    assert torch.equal(ya, yp) and torch.equal(aug.train_set.x, plain.train_set.x)
    changed = (xa != xp).flatten(1).any(1).float().mean().item()
    assert changed > 0.9  # 1 in 81 crops x 1 in 2 flips leaves an image as it was
    black = ((0 - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)).view(1, 3, 1, 1)
    assert torch.isclose(xa, black.expand_as(xa)).all(1).any()  # the crop's black border
    torch.manual_seed(0)
    assert torch.equal(aug.train_set.tensors()[0], xa)  # reproducible from the (run) seed
    clone = pickle.loads(pickle.dumps(aug.train_set))  # what a spawned loader worker gets
    assert len(clone) == 90 and clone.tensors()[0].shape == (90, 3, 32, 32)
    flip_only = _cifar(fake_cifar, crop_padding=0).train_set.tensors()[0]
    same = (flip_only == xp).flatten(1).all(1) | (flip_only == xp.flip(-1)).flatten(1).all(1)
    assert same.all()


def test_cifar_split_depends_on_split_seed_only(fake_cifar):
    a, b = _cifar(fake_cifar, augment=False), _cifar(fake_cifar, augment=False)
    c = _cifar(fake_cifar, augment=False, split_seed=1)
    assert torch.equal(a.val_set.x, b.val_set.x) and torch.equal(a.train_set.y, b.train_set.y)
    assert not torch.equal(a.val_set.x, c.val_set.x)
    assert sorted(a.val_set.y.tolist()) == list(range(10))  # stratified: one image per class


def test_cifar_trains_a_model_through_the_runner(fake_cifar, tracking_uri):
    from litlab import runner

    raw = {"name": "cifar_fake", "model": {"name": "resnet", "width": 0.0625},
           "data": {"name": "cifar10", "path": str(fake_cifar), "batch_size": 32},
           "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False}}
    result = runner.run(raw, ["tracking.system_metrics=false"], tracking_uri=tracking_uri)
    assert result.status == "FINISHED" and "test/acc" in result.metrics
