"""Chapter 3 networks as plain nn.Modules (no Lightning): LeNet-5 and a configurable ResNet.

Shapes are written (B, C, H, W). `ResNet` is the one builder behind every ResNet of the course:

    ResNet("basic", [2, 2, 2, 2], [64, 128, 256, 512], 3, 1000, stem="imagenet")       # ResNet-18
    ResNet("basic", [3, 4, 6, 3], [64, 128, 256, 512], 3, 1000, stem="imagenet")       # ResNet-34
    ResNet("bottleneck", [3, 4, 6, 3], [64, 128, 256, 512], 3, 1000, stem="imagenet")  # ResNet-50
    ResNet("basic", [1, 1, 1], [16, 32, 64], 1, 10, stem="cifar")                      # 8x8 digits
    resnet(18, num_classes=10, in_channels=1, stem="cifar", width=0.25)                # the presets

AlexNet, VGG and MobileNet are in zoo.py.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


def activation_layer(name: str) -> nn.Module:
    return {"tanh": nn.Tanh, "relu": nn.ReLU}[name]()


def pool_layer(name: str, size: int = 2) -> nn.Module:
    return {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}[name](size)


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output side of a conv or pool: floor((n + 2p - f) / s) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


# ---------------------------------------------------------------- LeNet-5
class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998), modernised the usual way: every C3 map sees all 6 S2 maps (the
    paper wired a sparse table), pooling has no trainable coefficient, and the output layer is a
    linear layer instead of the RBF units. Made for 32x32 inputs; any side >= 16 works."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: tuple[int, int] = (32, 32),
                 activation: Literal["tanh", "relu"] = "tanh", pool: Literal["avg", "max"] = "avg",
                 dropout: float = 0.0):
        super().__init__()
        h, w = image_size
        for _ in range(2):  # conv 5x5 (valid) then pool 2x2, twice
            h, w = conv_out(h, 5) // 2, conv_out(w, 5) // 2
        if h < 1 or w < 1:
            raise ValueError(f"LeNet-5 needs images of at least 16x16, got {tuple(image_size)}")
        self.flat_features = 16 * h * w  # 16*5*5 = 400 for 32x32
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), activation_layer(activation),  # C1: (B,1,32,32) -> (B,6,28,28)
            pool_layer(pool),                                             # S2: -> (B,6,14,14)
            nn.Conv2d(6, 16, 5), activation_layer(activation),           # C3: -> (B,16,10,10)
            pool_layer(pool),                                             # S4: -> (B,16,5,5)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),                                                 # (B,16,5,5) -> (B,400)
            nn.Linear(self.flat_features, 120), activation_layer(activation), nn.Dropout(dropout),  # C5: (B,120)
            nn.Linear(120, 84), activation_layer(activation), nn.Dropout(dropout),                  # F6: (B,84)
            nn.Linear(84, num_classes),                                   # output: (B,num_classes) logits
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ---------------------------------------------------------------- ResNet blocks
def projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Shortcut of a block: identity when the shape is kept, else W_s x = BN(conv1x1_stride(x))
    (option B of He et al. 2015), which matches both the channel count and the spatial size."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class ResidualBlock(nn.Module):
    """y = relu(F(x) + W_s x): subclasses build `residual` (F) and `shortcut` (W_s, identity or
    projection)."""

    residual: nn.Sequential
    shortcut: nn.Module
    act: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.residual(x) + self.shortcut(x))

    def last_bn(self) -> nn.BatchNorm2d:
        return self.residual[-1]


class BasicBlock(ResidualBlock):
    """y = relu(F(x, {W_1, W_2}) + W_s x), F = BN(conv3x3(relu(BN(conv3x3_stride(x))))).

    (B, C_in, H, W) -> (B, width, H/stride, W/stride); W_s is the identity unless that changes the
    shape, then a 1x1 projection. Convs carry no bias: the BN after each one has its own shift."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        self.out_channels = width * self.expansion
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False),  # (B,width,H/s,W/s)
            nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        )
        self.shortcut = projection(in_channels, self.out_channels, stride)
        self.act = nn.ReLU(inplace=True)


class Bottleneck(ResidualBlock):
    """y = relu(F(x) + W_s x), F = 1x1 reduce (width) -> 3x3 stride (width) -> 1x1 expand (4*width).

    (B, C_in, H, W) -> (B, 4*width, H/stride, W/stride). The stride sits on the 3x3 conv (the
    torchvision "v1.5" variant), so the 1x1 reduction does not throw away 3/4 of the positions."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        self.out_channels = width * self.expansion
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),  # (B,width,H/s,W/s)
            nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, self.out_channels, 1, bias=False), nn.BatchNorm2d(self.out_channels),
        )
        self.shortcut = projection(in_channels, self.out_channels, stride)
        self.act = nn.ReLU(inplace=True)


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_stem(kind: str, in_channels: int, width: int) -> tuple[nn.Module, int]:
    """The layers before the first stage, and by how much they shrink H and W.

    imagenet: conv7x7/2 + max-pool 3x3/2 (224 -> 56), He et al. 2015 for ImageNet.
    cifar:    conv3x3/1 (32 -> 32), He et al. 2015 section 4.2 and ResNet-18-on-CIFAR adaptations;
              also the stem for tiny inputs (8x8 digits), where the imagenet stem would leave a 2x2
              map before any block.
    """
    if kind == "imagenet":
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1),
        ), 4
    if kind == "cifar":
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        ), 1
    raise ValueError(f"unknown stem {kind!r}: choose cifar or imagenet")


class ResNet(nn.Module):
    """stem -> stages -> global pool -> dropout -> linear.

    Stage i stacks `layers[i]` blocks of width `widths[i]`; its first block halves H and W (stride
    2) except in stage 0, and that block gets the projection shortcut whenever the shape changes.
    (B, C, H, W) -> stem (B, widths[0], H/d, W/d) -> stage i (B, e*widths[i], H/(d*2^i), W/(d*2^i))
    -> pool (B, e*widths[-1]) -> (B, num_classes), with d the stem's reduction and e the expansion.
    """

    def __init__(self, block: str | type[nn.Module], layers: list[int], widths: list[int],
                 in_channels: int = 3, num_classes: int = 1000,
                 stem: Literal["cifar", "imagenet"] = "imagenet", pool: Literal["avg", "max"] = "avg",
                 dropout: float = 0.0, zero_init_residual: bool = False):
        super().__init__()
        block = BLOCKS[block] if isinstance(block, str) else block
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"layers {list(layers)} and widths {list(widths)} need the same, non-zero length")
        self.stem, self.stem_reduction = make_stem(stem, in_channels, widths[0])
        stages, channels = [], widths[0]
        for i, (n, width) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(channels, width, stride=2 if (i > 0 and j == 0) else 1))
                channels = blocks[-1].out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.out_channels = channels  # e * widths[-1]
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.AdaptiveMaxPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes))
        self.reset_parameters(zero_init_residual)

    def reset_parameters(self, zero_init_residual: bool = False) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init for ReLU nets, as in the paper
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # every block starts as the identity: y = relu(0 + x) (Goyal et al. 2017)
            for m in self.modules():
                if hasattr(m, "last_bn"):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))  # (B, e*widths[-1], h, w)
        return self.head(self.pool(x))  # pool -> (B, C, 1, 1); flatten -> (B, C) -> (B, num_classes)


# ---------------------------------------------------------------- the standard depths
# depth -> (block, blocks per stage); the stage widths are 64-128-256-512 (x4 out of a bottleneck).
# Depth counts the weighted layers on the main path: 1 stem conv + convs in the blocks + 1 linear,
# e.g. 18 = 1 + 2*(2+2+2+2) + 1 and 50 = 1 + 3*(3+4+6+3) + 1.
RESNET_LAYOUTS: dict[int, tuple[str, list[int]]] = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
}
RESNET_WIDTHS = [64, 128, 256, 512]


def scale_width(channels: int, multiplier: float) -> int:
    """Channels of a layer under a width multiplier (alpha): round(alpha * c), at least 1."""
    return max(1, round(channels * multiplier))


def resnet(depth: int, num_classes: int = 1000, in_channels: int = 3, stem: Literal["cifar", "imagenet"] = "imagenet",
           width: float = 1.0, pool: Literal["avg", "max"] = "avg", dropout: float = 0.0,
           zero_init_residual: bool = False) -> ResNet:
    """ResNet-18/34/50 (He et al. 2015), every stage width scaled by `width`. With stem="imagenet",
    width=1 and 1000 classes these are torchvision's resnet18/34/50, parameter for parameter."""
    if depth not in RESNET_LAYOUTS:
        raise ValueError(f"no ResNet-{depth}: choose one of {sorted(RESNET_LAYOUTS)}")
    block, layers = RESNET_LAYOUTS[depth]
    widths = [scale_width(w, width) for w in RESNET_WIDTHS]
    return ResNet(block, layers, widths, in_channels, num_classes, stem=stem, pool=pool, dropout=dropout,
                  zero_init_residual=zero_init_residual)
