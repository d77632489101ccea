"""Chapter 3 model zoo as plain nn.Modules (no Lightning): AlexNet, VGG, MobileNet-v1, and a
multiply-add counter. Shapes are written (B, C, H, W); `width`/`alpha` multiply every layer's
channels (nets.scale_width) so the ImageNet designs fit small images and small CPUs.

With their ImageNet settings they are the published models, parameter for parameter:

    AlexNet(3, 1000, (224, 224), stem="imagenet", hidden=4096)         # torchvision alexnet: 61,100,840
    VGG(VGG_STAGES[16], VGG_WIDTHS, 3, 1000, (224, 224), hidden=4096)  # torchvision vgg16: 138,357,544
    MobileNetV1(3, 1000, alpha=1.0, schedule="imagenet")               # Howard et al. 2017: 4.2M, 569M MACs
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from litlab.chapters.cnn.nets import conv_out, scale_width


def downsample_pool(kind: str, kernel: int, stride: int) -> nn.Module:
    return {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[kind](kernel, stride)


def global_pool(kind: str) -> nn.Module:
    """(B, C, H, W) -> (B, C, 1, 1): the mean (global average pooling) or max over all positions."""
    return {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}[kind](1)


def init_relu_net(net: nn.Module) -> None:
    """He (Kaiming) normal init for convs of ReLU nets (fan_out, as torchvision), zero biases, BN = identity."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def fc_head(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    """AlexNet/VGG classifier: (B, in) -> dropout-fc-relu -> dropout-fc-relu -> fc -> (B, num_classes)."""
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
        nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


# ---------------------------------------------------------------- AlexNet
class AlexNet(nn.Module):
    """AlexNet (Krizhevsky et al. 2012), single-tower as in torchvision: 5 convs with ReLU, three
    OVERLAPPING pools (3x3 window, stride 2), then the fully connected classifier with dropout.

    stem="imagenet": conv 11x11 stride 4 (224 -> 55); conv5 output adaptively pooled to 6x6 (torchvision).
    stem="small":    conv 5x5 stride 1 for small images (32 -> 32 -> 15 -> 7 -> 3 after the pools).
    head="fc":  flatten -> [dropout, fc(hidden), relu] x 2 -> fc;  "gap": global average pool -> fc.
    lrn: local response normalisation after conv1 and conv2, the paper's k=2, n=5, alpha=1e-4,
    beta=0.75 (torch divides alpha by n, hence 5e-4 below)."""

    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, image_size: tuple[int, int] = (224, 224),
                 stem: Literal["small", "imagenet"] = "imagenet", width: float = 1.0, hidden: int = 4096,
                 pool: Literal["max", "avg"] = "max", head: Literal["fc", "gap"] = "fc", dropout: float = 0.5,
                 lrn: bool = False):
        super().__init__()
        c1, c2, c3, c4, c5 = (scale_width(c, width) for c in self.CHANNELS)
        k, s, p = (11, 4, 2) if stem == "imagenet" else (5, 1, 2)
        size = min(image_size)
        for kernel, stride, pad in ((k, s, p), (3, 2, 0), (3, 2, 0), (3, 2, 0)):  # conv1, then the 3 pools
            size = conv_out(size, kernel, stride, pad)
            if size < 1:
                raise ValueError(f"AlexNet ({stem} stem) needs larger images than {tuple(image_size)}: "
                                 f"at least {15 if stem == 'small' else 63} pixels a side")
        lrn_layer = (lambda: nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)) if lrn else nn.Identity
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, k, stride=s, padding=p), nn.ReLU(inplace=True), lrn_layer(),  # (B,c1,55,55)
            downsample_pool(pool, 3, 2),                                                # (B,c1,27,27) at 224
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True), lrn_layer(),
            downsample_pool(pool, 3, 2),                                                # (B,c2,13,13)
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(inplace=True),
            downsample_pool(pool, 3, 2),                                                # (B,c5,6,6)
        )
        if head == "gap":
            self.pool, flat = global_pool("avg"), c5
            self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c5, num_classes))
        else:
            grid = 6 if stem == "imagenet" else None  # small stem: flatten the map as it is (3x3 at 32)
            self.pool = nn.AdaptiveAvgPool2d(grid) if grid else nn.Identity()
            h, w = image_size
            for kernel, stride, pad in ((k, s, p), (3, 2, 0), (3, 2, 0), (3, 2, 0)):
                h, w = conv_out(h, kernel, stride, pad), conv_out(w, kernel, stride, pad)
            flat = c5 * (grid * grid if grid else h * w)
            self.classifier = nn.Sequential(nn.Flatten(), fc_head(flat, hidden, num_classes, dropout))
        init_relu_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))  # (B, c5, h, w) -> (B, num_classes)


# ---------------------------------------------------------------- VGG
# depth -> convs per stage; depth = number of convs + 3 fully connected layers (Simonyan & Zisserman
# 2015, table 1, configurations A, B, D, E).
VGG_STAGES: dict[int, list[int]] = {11: [1, 1, 2, 2, 2], 13: [2, 2, 2, 2, 2], 16: [2, 2, 3, 3, 3], 19: [2, 2, 4, 4, 4]}
VGG_WIDTHS = [64, 128, 256, 512, 512]


class VGG(nn.Module):
    """VGG: stages of 3x3 convs (stride 1, padding 1: H and W kept), each stage closed by a 2x2
    stride-2 pool; two stacked 3x3 convs see 5x5 and three see 7x7 with fewer weights (3*9*C^2 vs
    49*C^2) and more non-linearities. (B, C, H, W) -> stage i (B, widths[i], H/2^(i+1), W/2^(i+1)).

    batch_norm: conv -> BN -> ReLU (the conv then has no bias, BN's shift replaces it).
    head="fc": flatten the last map -> [dropout, fc(hidden), relu] x 2 -> fc (at 224, a 7x7 map and
    hidden=4096 as the paper); head="gap": global average pool -> fc (one linear layer)."""

    def __init__(self, stages: list[int], widths: list[int], in_channels: int = 3, num_classes: int = 1000,
                 image_size: tuple[int, int] = (224, 224), batch_norm: bool = False,
                 pool: Literal["max", "avg"] = "max", head: Literal["fc", "gap"] = "fc", hidden: int = 4096,
                 dropout: float = 0.5):
        super().__init__()
        if len(stages) != len(widths) or not stages:
            raise ValueError(f"stages {list(stages)} and widths {list(widths)} need the same, non-zero length")
        h, w = image_size[0] >> len(stages), image_size[1] >> len(stages)  # each pool halves (floor)
        if min(h, w) < 1:
            raise ValueError(f"{len(stages)} stages halve {tuple(image_size)} images {len(stages)} times: "
                             f"use fewer stages or images of at least {2 ** len(stages)} pixels a side")
        layers, c = [], in_channels
        for n, width in zip(stages, widths):
            for _ in range(n):
                layers += [nn.Conv2d(c, width, 3, padding=1, bias=not batch_norm)]
                layers += [nn.BatchNorm2d(width)] if batch_norm else []
                layers += [nn.ReLU(inplace=True)]
                c = width
            layers.append(downsample_pool(pool, 2, 2))
        self.features = nn.Sequential(*layers)
        if head == "gap":
            self.classifier = nn.Sequential(global_pool("avg"), nn.Flatten(), nn.Dropout(dropout),
                                            nn.Linear(c, num_classes))
        else:
            self.classifier = nn.Sequential(nn.Flatten(), fc_head(c * h * w, hidden, num_classes, dropout))
        init_relu_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # (B, widths[-1], h, w) -> (B, num_classes)


# ---------------------------------------------------------------- MobileNet-v1
def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class DepthwiseSeparable(nn.Sequential):
    """A standard f x f conv (C_in -> C_out) factored in two (Howard et al. 2017):
    depthwise f x f conv, one filter per input channel (groups=C_in), BN, ReLU: (B, C_in, H/s, W/s);
    pointwise 1x1 conv mixing the channels, BN, ReLU:                           (B, C_out, H/s, W/s).
    Multiply-adds per output position: f^2 C_in + C_in C_out instead of f^2 C_in C_out, a ratio of
    1/C_out + 1/f^2 (about 1/8 to 1/9 for 3x3)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, kernel: int = 3):
        super().__init__(*conv_bn_relu(c_in, c_in, kernel, stride, groups=c_in), *conv_bn_relu(c_in, c_out, 1))

    @property
    def depthwise(self) -> nn.Conv2d:
        return self[0]

    @property
    def pointwise(self) -> nn.Conv2d:
        return self[3]


# (output channels, stride) of the 13 separable blocks (Howard et al. 2017, table 1); the stem is a
# full 3x3 conv to 32 channels, stride 2. The "shallow" net of table 14 drops the five 512 -> 512 blocks.
MOBILENET_V1 = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


class MobileNetV1(nn.Module):
    """stem conv3x3 -> 13 depthwise separable blocks -> global pool -> dropout -> linear.

    alpha: width multiplier, every layer's channels x alpha (cost ~ alpha^2); the resolution
    multiplier is simply the input size (data.image_size). schedule: "imagenet" downsamples 32x
    (stem stride 2: 224 -> 7x7); "cifar" keeps the stem at stride 1, 16x (32 -> 2x2, 16 -> 1x1),
    the usual adaptation for small images."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, alpha: float = 1.0,
                 schedule: Literal["imagenet", "cifar"] = "imagenet", shallow: bool = False,
                 pool: Literal["avg", "max"] = "avg", dropout: float = 0.0):
        super().__init__()
        c = scale_width(32, alpha)
        layers = conv_bn_relu(in_channels, c, 3, stride=2 if schedule == "imagenet" else 1)
        for i, (out, stride) in enumerate(MOBILENET_V1):
            if shallow and 6 <= i <= 10:
                continue
            layers.append(DepthwiseSeparable(c, scale_width(out, alpha), stride))
            c = scale_width(out, alpha)
        self.features = nn.Sequential(*layers)
        self.out_channels = c
        self.head = nn.Sequential(global_pool(pool), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))
        init_relu_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, 1024 alpha, h, w) -> (B, num_classes)


# ---------------------------------------------------------------- cost
@torch.no_grad()
def count_macs(net: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Multiply-adds of one image through every Conv2d and Linear, by module name (forward hooks).

    conv: H_out W_out C_out (C_in / groups) f_h f_w; linear: out_features in_features. BN, ReLU,
    pooling and biases are left out (the convention of the MobileNet and ResNet papers)."""
    macs: dict[str, int] = {}

    def hook(name):
        def fn(m, inputs, out):
            per_image = out[0].numel()  # C_out H_out W_out (conv), out_features (linear)
            if isinstance(m, nn.Conv2d):
                macs[name] = per_image * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            else:
                macs[name] = per_image * m.in_features
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = net.training
    try:
        net.eval()(torch.zeros(1, *input_shape, device=next(net.parameters()).device))
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    return macs
