"""Chapter 3 LightningModules: the registered `lenet5`, `resnet_small`, `alexnet`, `vgg`, `resnet`
and `mobilenet` classifiers.

The __init__ signatures are the `model:` schema of a config; `input_shape` and `num_classes` have
no default because the runner fills them from the data's info(). Loss, metrics and optimiser come
from ClassifierModule; these classes only build `self.net` (see nets.py and zoo.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from litlab.chapters.cnn.nets import LeNet5, ResNet, resnet, scale_width
from litlab.chapters.cnn.zoo import VGG, VGG_STAGES, VGG_WIDTHS, AlexNet, MobileNetV1
from litlab.errors import ConfigError
from litlab.module import ClassifierModule
from litlab.registry import register_model
from litlab.schema import Range

CHAPTER = "3 Convolutional networks"

Side = Annotated[int, Range(ge=1, le=100_000)]
ImageShape = tuple[Side, Side, Side]  # (C, H, W)
NumClasses = Annotated[int, Range(ge=2, le=1_000_000)]
Dropout = Annotated[float, Range(ge=0, lt=1)]
Multiplier = Annotated[float, Range(gt=0, le=16)]  # width multiplier: channels x this


def _net(build):
    """Build a zoo net; its ValueError about impossible shapes becomes a ConfigError on the input."""
    try:
        return build()
    except ValueError as e:
        raise ConfigError("model.input_shape", f"{e} (set data.image_size)") from None


@register_model(
    "lenet5",
    chapter=CHAPTER,
    description="LeNet-5 (LeCun 1998): conv5x5(6)-pool-conv5x5(16)-pool-fc120-fc84-fc, for 32x32 images",
    smoke={"model": {"activation": "relu", "pool": "max"},
           "data": {"name": "digits", "image_size": 32, "batch_size": 8}},
)
class LeNet5Classifier(ClassifierModule):
    def __init__(
        self,
        input_shape: ImageShape,
        num_classes: NumClasses,
        activation: Literal["tanh", "relu"] = "tanh",
        pool: Literal["avg", "max"] = "avg",
        dropout: Dropout = 0.0,
    ):
        super().__init__(num_classes)
        self.save_hyperparameters()
        c, h, w = input_shape
        if min(h, w) < 16:
            raise ConfigError("model.input_shape", f"LeNet-5 needs images of at least 16x16 (made for 32x32), got "
                              f"{h}x{w}; for digits set data.image_size=32")
        self.net = LeNet5(c, num_classes, (h, w), activation=activation, pool=pool, dropout=dropout)


@register_model(
    "resnet_small",
    chapter=CHAPTER,
    description="Small ResNet (He et al. 2015): 3x3 stem, stages of basic or bottleneck residual blocks, global pool",
    smoke={"model": {"blocks": [1, 1], "widths": [4, 8], "block": "bottleneck"},
           "data": {"name": "digits", "batch_size": 8}},
)
class ResNetSmallClassifier(ClassifierModule):
    def __init__(
        self,
        input_shape: ImageShape,
        num_classes: NumClasses,
        blocks: list[Annotated[int, Range(ge=1, le=100)]] = [1, 1, 1],  # noqa: B006 (schema default, never mutated)
        widths: list[Annotated[int, Range(ge=1, le=4096)]] = [16, 32, 64],  # noqa: B006
        block: Literal["basic", "bottleneck"] = "basic",
        pool: Literal["avg", "max"] = "avg",
        dropout: Dropout = 0.0,
    ):
        super().__init__(num_classes)
        self.save_hyperparameters()
        if len(blocks) != len(widths) or not blocks:
            raise ConfigError("model.widths", f"needs one width per stage: blocks has {len(blocks)} stages, "
                              f"widths {len(widths)} (e.g. blocks=[1,1,1] widths=[16,32,64])")
        c, h, w = input_shape
        # Every stage after the first halves H and W (rounding up): 8x8 with 3 stages -> 8, 4, 2.
        if min(h, w) < 2 ** (len(blocks) - 1):
            raise ConfigError("model.blocks", f"{len(blocks)} stages halve a {h}x{w} image "
                              f"{len(blocks) - 1} times: use fewer stages or larger images")
        self.net = ResNet(block, list(blocks), list(widths), in_channels=c, num_classes=num_classes,
                          stem="cifar", pool=pool, dropout=dropout)


@register_model(
    "alexnet",
    chapter=CHAPTER,
    description="AlexNet (Krizhevsky 2012): 5 convs, ReLU, overlapping 3x3/2 pools, dropout FC head; "
                "small or imagenet stem",
    smoke={"model": {"width": 0.0625, "hidden": 16, "lrn": True},
           "data": {"name": "digits", "image_size": 16, "batch_size": 8}},
)
class AlexNetClassifier(ClassifierModule):
    """AlexNet scaled by `width` (conv channels 64-192-384-256-256 x width). stem="small" (5x5
    stride-1 first conv) suits images of 15 to ~64 pixels (32x32: 32 -> 15 -> 7 -> 3 through the
    pools), "imagenet" (11x11 stride 4) 224x224; see zoo.AlexNet. `hidden` is the width of the two
    FC layers (4096 in the paper); head="gap" replaces them by global average pooling + one linear."""

    def __init__(
        self,
        input_shape: ImageShape,
        num_classes: NumClasses,
        width: Multiplier = 1.0,
        stem: Literal["small", "imagenet"] = "small",
        hidden: Annotated[int, Range(ge=1, le=65_536)] = 1024,
        pool: Literal["max", "avg"] = "max",  # the three overlapping 3x3 stride-2 pools
        head: Literal["fc", "gap"] = "fc",
        dropout: Dropout = 0.5,  # before each FC layer (the paper: 0.5)
        lrn: bool = False,  # local response normalisation after conv1 and conv2 (the paper's)
    ):
        super().__init__(num_classes)
        self.save_hyperparameters()
        c, h, w = input_shape
        self.net = _net(lambda: AlexNet(c, num_classes, (h, w), stem=stem, width=width, hidden=hidden, pool=pool,
                                        head=head, dropout=dropout, lrn=lrn))


@register_model(
    "vgg",
    chapter=CHAPTER,
    description="VGG (Simonyan & Zisserman 2015): stages of 3x3 convs + 2x2 pools; depth 11/13/16/19 presets "
                "or any layout",
    smoke={"model": {"stages": [1, 2], "widths": [4, 8], "batch_norm": True, "hidden": 16},
           "data": {"name": "digits", "batch_size": 8}},
)
class VGGClassifier(ClassifierModule):
    """VGG: either `depth` (11/13/16/19: VGG's stage layout, depth - 3 convs) or `stages` (convs per
    stage); `widths` default to VGG's 64-128-256-512-512 (512 past the fifth stage); every width is
    then multiplied by `width`. Each stage ends with a 2x2 stride-2 pool, so images need at least
    2^stages pixels a side (5 stages: 32). Neither depth nor stages: VGG-11."""

    def __init__(
        self,
        input_shape: ImageShape,
        num_classes: NumClasses,
        depth: Literal[11, 13, 16, 19] | None = None,
        stages: list[Annotated[int, Range(ge=1, le=64)]] | None = None,  # convs per stage, instead of depth
        widths: list[Annotated[int, Range(ge=1, le=8192)]] | None = None,  # channels per stage (before x width)
        width: Multiplier = 1.0,
        batch_norm: bool = False,  # conv -> BN -> ReLU (the paper predates BN)
        pool: Literal["max", "avg"] = "max",  # the 2x2 stride-2 pool closing each stage
        head: Literal["fc", "gap"] = "fc",
        hidden: Annotated[int, Range(ge=1, le=65_536)] = 512,  # FC width (4096 in the paper, for 224x224)
        dropout: Dropout = 0.5,
    ):
        super().__init__(num_classes)
        self.save_hyperparameters()
        if depth is not None and stages is not None:
            raise ConfigError("model.stages", f"set either depth ({depth}: a preset layout) or stages, not both")
        layout = list(stages) if stages is not None else VGG_STAGES[depth or 11]
        base = list(widths) if widths is not None else (VGG_WIDTHS + [512] * len(layout))[: len(layout)]
        if len(base) != len(layout):
            raise ConfigError("model.widths", f"needs one width per stage: {len(layout)} stages, {len(base)} widths")
        c, h, w = input_shape
        self.net = _net(lambda: VGG(layout, [scale_width(x, width) for x in base], c, num_classes, (h, w),
                                    batch_norm=batch_norm, pool=pool, head=head, hidden=hidden, dropout=dropout))


@register_model(
    "resnet",
    chapter=CHAPTER,
    description="ResNet-18/34 (basic blocks) and ResNet-50 (bottleneck) by depth, cifar or imagenet stem, "
                "width multiplier",
    smoke={"model": {"depth": 18, "width": 0.0625},
           "data": {"name": "digits", "batch_size": 8}},
)
class ResNetClassifier(ClassifierModule):
    """ResNet-`depth` with stage widths 64-128-256-512 x width (nets.resnet). stem="cifar" (3x3
    stride 1) keeps small images whole: 8x8 digits -> 8, 4, 2, 1 through the stages; "imagenet"
    (7x7 stride 2 + max-pool) divides by 4 first and is meant for >= 64x64 images. With the imagenet
    stem, width 1 and 1000 classes the parameter counts are torchvision's (11.7M / 21.8M / 25.6M)."""

    def __init__(
        self,
        input_shape: ImageShape,
        num_classes: NumClasses,
        depth: Literal[18, 34, 50] = 18,
        stem: Literal["cifar", "imagenet"] = "cifar",
        width: Multiplier = 1.0,
        pool: Literal["avg", "max"] = "avg",  # global pool before the linear layer
        dropout: Dropout = 0.0,
        zero_init_residual: bool = False,  # last BN of each block at 0: every block starts as identity
    ):
        super().__init__(num_classes)
        self.save_hyperparameters()
        c, _, _ = input_shape
        self.net = resnet(depth, num_classes, c, stem=stem, width=width, pool=pool, dropout=dropout,
                          zero_init_residual=zero_init_residual)


@register_model(
    "mobilenet",
    chapter=CHAPTER,
    description="MobileNet-v1 (Howard et al. 2017): 13 depthwise separable conv blocks, width multiplier alpha",
    smoke={"model": {"alpha": 0.0625, "shallow": True},
           "data": {"name": "digits", "batch_size": 8}},
)
class MobileNetClassifier(ClassifierModule):
    """MobileNet-v1 with every layer's channels x alpha (32 ... 1024 at alpha 1). schedule="cifar"
    (stem at stride 1, 16x downsampling: 32x32 -> 2x2) for small images, "imagenet" (32x: 224 -> 7);
    shallow drops the five 512-channel blocks (the paper's shallow net). See zoo.MobileNetV1."""

    def __init__(
        self,
        input_shape: ImageShape,
        num_classes: NumClasses,
        alpha: Multiplier = 1.0,
        schedule: Literal["cifar", "imagenet"] = "cifar",
        shallow: bool = False,
        pool: Literal["avg", "max"] = "avg",  # global pool before the linear layer
        dropout: Dropout = 0.0,
    ):
        super().__init__(num_classes)
        self.save_hyperparameters()
        c, _, _ = input_shape
        self.net = MobileNetV1(c, num_classes, alpha=alpha, schedule=schedule, shallow=shallow, pool=pool,
                               dropout=dropout)
