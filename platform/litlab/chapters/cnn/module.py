"""Chapter 3 LightningModules: the registered `lenet5` and `resnet_small` classifiers.

The __init__ signatures are the `model:` schema of a config; `input_shape` and `num_classes` have
no default because the runner fills them from the data's info(). Loss, metrics and optimiser come
from ClassifierModule; these classes only build `self.net` (see nets.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from litlab.chapters.cnn.nets import LeNet5, ResNet
from litlab.errors import ConfigError
from litlab.module import ClassifierModule
from litlab.registry import register_model
from litlab.schema import Range

CHAPTER = "3 Convolutional networks"

Side = Annotated[int, Range(ge=1, le=100_000)]
ImageShape = tuple[Side, Side, Side]  # (C, H, W)
NumClasses = Annotated[int, Range(ge=2, le=1_000_000)]
Dropout = Annotated[float, Range(ge=0, lt=1)]


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
