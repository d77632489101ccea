"""Chapter 3 (convolutional networks): LeNet-5 and ResNet shapes, parameter counts, the residual
equation y = relu(F(x) + W_s x), registration, the experiment YAMLs, and LeNet-5 really learning."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from litlab import config, registry
from litlab.chapters.cnn.module import LeNet5Classifier, ResNetSmallClassifier
from litlab.chapters.cnn.nets import BasicBlock, Bottleneck, LeNet5, ResNet
from litlab.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def stage_shapes(seq: nn.Sequential, x: torch.Tensor) -> list[tuple[int, ...]]:
    out = []
    for layer in seq:
        x = layer(x)
        out.append(tuple(x.shape))
    return out


# ---------------------------------------------------------------- LeNet-5
def test_lenet5_shapes_through_every_stage():
    net = LeNet5(1, 10, (32, 32))
    x = torch.randn(2, 1, 32, 32)
    assert stage_shapes(net.features, x) == [
        (2, 6, 28, 28), (2, 6, 28, 28),  # C1 conv 5x5 + tanh: 32 - 5 + 1 = 28
        (2, 6, 14, 14),                  # S2 pool 2x2
        (2, 16, 10, 10), (2, 16, 10, 10),  # C3 conv 5x5 + tanh
        (2, 16, 5, 5),                   # S4 pool 2x2
    ]
    assert stage_shapes(net.classifier, net.features(x)) == [
        (2, 400),                                   # flatten 16*5*5
        (2, 120), (2, 120), (2, 120),               # C5 linear, tanh, dropout
        (2, 84), (2, 84), (2, 84),                  # F6
        (2, 10),                                    # logits
    ]


def test_lenet5_parameter_count_for_32x32_by_hand():
    conv1 = 6 * 1 * 5 * 5 + 6      # 156
    conv2 = 16 * 6 * 5 * 5 + 16    # 2416 (the paper's sparse C3 table had 1516)
    fc1 = 16 * 5 * 5 * 120 + 120   # 48120
    fc2 = 120 * 84 + 84            # 10164
    fc3 = 84 * 10 + 10             # 850
    assert conv1 + conv2 + fc1 + fc2 + fc3 == 61706
    assert n_params(LeNet5(1, 10, (32, 32))) == 61706
    assert n_params(LeNet5Classifier(input_shape=(1, 32, 32), num_classes=10)) == 61706  # metrics hold none


def test_lenet5_other_input_sizes():
    net = LeNet5(1, 10, (28, 28), activation="relu", pool="max")  # 28 -> 24 -> 12 -> 8 -> 4
    assert net.flat_features == 16 * 4 * 4
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert LeNet5(3, 5, (64, 48))(torch.randn(1, 3, 64, 48)).shape == (1, 5)
    with pytest.raises(ConfigError, match="data.image_size=32"):
        LeNet5Classifier(input_shape=(1, 8, 8), num_classes=10)


@pytest.mark.parametrize("c_in,c_out,f", [(1, 6, 5), (6, 16, 5), (3, 64, 7), (16, 32, 3), (64, 256, 1)])
def test_conv_parameter_count(c_in, c_out, f):
    """A conv layer has C_out kernels of C_in x f x f weights, plus one bias per output channel."""
    assert n_params(nn.Conv2d(c_in, c_out, f)) == c_out * c_in * f * f + c_out
    assert n_params(nn.Conv2d(c_in, c_out, f, bias=False)) == c_out * c_in * f * f


def test_every_conv_in_the_chapter_matches_the_formula():
    nets = [LeNet5(), ResNet("basic", [1, 1, 1], [16, 32, 64], 1, 10, stem="cifar"),
            ResNet("bottleneck", [1, 1], [8, 16], 3, 10, stem="imagenet")]
    convs = [m for net in nets for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) > 10
    for c in convs:
        (kh, kw), bias = c.kernel_size, c.out_channels if c.bias is not None else 0
        assert n_params(c) == c.out_channels * c.in_channels * kh * kw + bias
        assert n_params(c) == n_params(nn.Conv2d(c.in_channels, c.out_channels, (kh, kw), bias=c.bias is not None))


# ---------------------------------------------------------------- ResNet
def test_resnet_shapes_through_every_stage():
    net = ResNet("basic", [1, 1, 1], [16, 32, 64], in_channels=1, num_classes=10, stem="cifar")
    x = torch.randn(2, 1, 8, 8)
    assert net.stem(x).shape == (2, 16, 8, 8)  # the small stem keeps 8x8
    assert stage_shapes(net.stages, net.stem(x)) == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    assert net(x).shape == (2, 10)

    net = ResNet("bottleneck", [2, 1], [8, 16], in_channels=3, num_classes=7, stem="imagenet", pool="max")
    x = torch.randn(2, 3, 64, 64)
    assert net.stem(x).shape == (2, 8, 16, 16)  # 7x7/2 conv + 3x3/2 max-pool: 64 -> 16
    assert stage_shapes(net.stages, net.stem(x)) == [(2, 32, 16, 16), (2, 64, 8, 8)]  # 4 x widths
    assert net(x).shape == (2, 7)

    assert ResNet("basic", [1], [4], 3, 2, stem="cifar").stem(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32, 32)


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
@pytest.mark.parametrize("c_in,width,stride", [(16, 16, 1), (64, 16, 1), (16, 16, 2), (16, 32, 1), (64, 32, 2)])
def test_projection_shortcut_exactly_when_shape_changes(block, c_in, width, stride):
    b = block(c_in, width, stride)
    x = torch.randn(2, c_in, 8, 8)
    shape_kept = stride == 1 and c_in == width * block.expansion
    assert b.residual(x).shape == (2, width * block.expansion, 8 // stride, 8 // stride)
    assert isinstance(b.shortcut, nn.Identity) == shape_kept
    if not shape_kept:  # W_s x = BN(conv1x1 stride s (x))
        conv, bn = b.shortcut
        assert (conv.kernel_size, conv.stride, conv.in_channels, conv.out_channels) == ((1, 1), (stride, stride),
                                                                                        c_in, width * block.expansion)
        assert isinstance(bn, nn.BatchNorm2d)
    assert b.shortcut(x).shape == b.residual(x).shape


def test_resnet_projects_once_per_stage_that_changes_shape():
    def projections(net):
        return sum(not isinstance(m.shortcut, nn.Identity) for m in net.modules() if hasattr(m, "shortcut"))

    assert projections(ResNet("basic", [2, 2, 2], [16, 32, 64], 1, 10, stem="cifar")) == 2  # stages 2, 3
    assert projections(ResNet("basic", [2, 2], [16, 16], 1, 10, stem="cifar")) == 1  # stride 2 alone
    assert projections(ResNet("bottleneck", [2, 2], [16, 32], 1, 10, stem="cifar")) == 2  # 16 -> 64 at stage 1


def _bn_eval(x, bn):
    return (x - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps) \
        * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]


@pytest.mark.parametrize("c_in,width,stride", [(8, 8, 1), (8, 16, 2)])
def test_basic_block_output_is_residual_plus_shortcut(c_in, width, stride):
    """y = relu(F(x, {W_1, W_2}) + W_s x), computed by hand with F.conv2d and the BN formula."""
    torch.manual_seed(0)
    b = BasicBlock(c_in, width, stride).eval()
    for m in b.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5), nn.init.uniform_(m.bias, -0.5, 0.5)
    x = torch.randn(4, c_in, 8, 8)
    conv1, bn1, _, conv2, bn2 = b.residual
    h = F.relu(_bn_eval(F.conv2d(x, conv1.weight, stride=stride, padding=1), bn1))
    residual = _bn_eval(F.conv2d(h, conv2.weight, padding=1), bn2)
    if stride == 1 and c_in == width:
        shortcut = x  # identity
    else:
        conv_s, bn_s = b.shortcut
        shortcut = _bn_eval(F.conv2d(x, conv_s.weight, stride=stride), bn_s)  # W_s x
    with torch.no_grad():
        torch.testing.assert_close(b.residual(x), residual)
        torch.testing.assert_close(b.shortcut(x), shortcut)
        torch.testing.assert_close(b(x), F.relu(residual + shortcut))


def test_bottleneck_expansion():
    b = Bottleneck(64, 16)  # 64 = 4 * 16: the identity shortcut fits
    convs = [m for m in b.residual if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.in_channels, c.out_channels) for c in convs] == [
        ((1, 1), 64, 16), ((3, 3), 16, 16), ((1, 1), 16, 64)]  # reduce, 3x3 at the narrow width, expand x4
    assert Bottleneck.expansion == 4 and b.out_channels == 64 and isinstance(b.shortcut, nn.Identity)
    assert b(torch.randn(2, 64, 4, 4)).shape == (2, 64, 4, 4)
    assert Bottleneck(16, 32, stride=2)(torch.randn(2, 16, 8, 8)).shape == (2, 128, 4, 4)


def test_resnet_builder_gives_the_standard_imagenet_models():
    """Same counts as torchvision's resnet18 / resnet50 (ImageNet, 1000 classes)."""
    assert n_params(ResNet("basic", [2, 2, 2, 2], [64, 128, 256, 512], 3, 1000, stem="imagenet")) == 11_689_512
    assert n_params(ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], 3, 1000, stem="imagenet")) == 25_557_032


def test_zero_init_residual_makes_blocks_start_as_identity():
    net = ResNet("basic", [2], [8], 8, 10, stem="cifar", zero_init_residual=True).eval()
    x = torch.rand(2, 8, 4, 4)  # >= 0 so relu(x) = x
    with torch.no_grad():
        torch.testing.assert_close(net.stages[0][0](x), x)


def test_resnet_small_config_errors():
    with pytest.raises(ConfigError, match="model.widths"):
        ResNetSmallClassifier(input_shape=(1, 8, 8), num_classes=10, blocks=[1, 1], widths=[16, 32, 64])
    with pytest.raises(ConfigError, match="model.blocks"):
        ResNetSmallClassifier(input_shape=(1, 8, 8), num_classes=10, blocks=[1] * 5, widths=[8] * 5)


# ---------------------------------------------------------------- registry, configs, learning
def _data_info(cls, args):
    return cls(**args).info()


def test_registered_with_chapter_and_smoke_configs():
    for name in ("lenet5", "resnet_small"):
        entry = registry.get_model(name)
        assert entry.chapter == "3 Convolutional networks" and entry.description
        cfg = config.validate({"model": {"name": name, **entry.smoke["model"]}, "data": entry.smoke["data"]},
                              data_info=_data_info)
        dm = registry.get_data("digits").cls(**{k: v for k, v in cfg.data.items() if k != "name"})
        model = entry.cls(**{k: v for k, v in cfg.model.items() if k != "name"})
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))
        assert model(x).shape == (len(y), 10)
    assert registry.get_model("lenet5").smoke["data"]["image_size"] == 32


@pytest.mark.parametrize("path", ["experiments/cnn/lenet_digits.yaml", "experiments/cnn/resnet_digits.yaml"])
def test_experiment_yamls_validate(path):
    cfg = config.load(REPO / path, data_info=_data_info)
    assert cfg.callbacks.checkpoint.monitor == "val/acc" and cfg.callbacks.checkpoint.mode == "max"
    assert cfg.model["input_shape"] == (1, cfg.data["image_size"], cfg.data["image_size"])


def test_lenet5_learns_digits():
    from litlab.data.digits import DigitsDataModule

    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, image_size=32, augment=True)  # 0.978-0.985 over seeds 0-5
    model = LeNet5Classifier(input_shape=(1, 32, 32), num_classes=10, activation="relu", pool="max")
    model.optim_config = config.OptimConfig(name="adam", lr=3e-3, scheduler=config.SchedulerConfig(name="cosine"))
    trainer = L.Trainer(accelerator="cpu", max_epochs=10, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, dm)  # ~3 s of training on 2 idle cores (200 steps)
    acc = trainer.test(model, dm, verbose=False)[0]["test/acc"]  # last weights, 270 test images
    assert acc >= 0.95, f"LeNet-5 reached only {acc:.3f} test accuracy on digits"
