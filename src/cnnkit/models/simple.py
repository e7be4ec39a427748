"""Plain stacks of convolutions: simple_cnn (the default model), LeNet-5 and VGG with batch norm.

simple_cnn is sized for small images: on sklearn digits (1x8x8, 1437 training images, 20% held
out) it reached 99.4-100% test accuracy over 5 seeds in 15 epochs of SGD (Nesterov, one-cycle
to lr 0.05, label smoothing 0.1, batch 64), in about 3 s each on an idle 2-core CPU. Every model
here pools adaptively before its head and rounds max-pool sizes up, so it runs on 8x8 to 224x224.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.models._registry import (
    CIFAR_MEAN,
    CIFAR_STD,
    MNIST_MEAN,
    MNIST_STD,
    register_model,
)
from cnnkit.models.layers import (
    ClassifierHead,
    ClassifierModel,
    ConvBNAct,
    base_cfg,
    init_weights,
    make_act,
)


class SimpleCNN(ClassifierModel):
    """Stages of ``depth`` 3x3 ConvBNAct, a 2x2 max pool between stages, global pool + linear.

    Defaults (widths 32-64-128, one conv each): 94k parameters at 10 classes; an 8x8 input ends
    as a 2x2 map. ``depth=2`` doubles the convs for harder data (about 3x slower).
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        widths: tuple[int, ...] = (32, 64, 128),
        depth: int = 1,
        drop_rate: float = 0.1,
        act: str = "relu",
    ) -> None:
        super().__init__()
        layers, chs = [], in_chans
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            for _ in range(depth):
                layers.append(ConvBNAct(chs, width, 3, act=act))
                chs = width
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(chs, num_classes, drop_rate=drop_rate)
        self.num_classes = num_classes
        self.default_cfg = base_cfg(in_chans, "features", (32, 32))
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, in_chans, H, W) -> (B, widths[-1], H/4, W/4)


class LeNet5(ClassifierModel):
    """LeNet-5 with ReLU and max pooling: conv5x5(6) -> pool -> conv5x5(16) -> pool -> 120 -> 84.

    Both convs are padded, and the head pools adaptively to the classic 16x5x5 before its MLP, so
    the 400 -> 120 -> 84 head is the same at any input size (28x28: 7x7 map pooled to 5x5).
    """

    def __init__(
        self, *, num_classes: int = 10, in_chans: int = 1, act: str = "relu", drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNAct(in_chans, 6, 5, norm=False, act=act),
            nn.MaxPool2d(2, ceil_mode=True),
            ConvBNAct(6, 16, 5, norm=False, act=act),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        hidden = nn.Sequential(
            nn.Linear(400, 120), make_act(act), nn.Linear(120, 84), make_act(act)
        )
        self.head = ClassifierHead(16, num_classes, "avg", drop_rate, 5, hidden, 84)
        self.num_classes = num_classes
        self.default_cfg = base_cfg(in_chans, "features.2", (28, 28))
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, in_chans, H, W) -> (B, 16, H/4, W/4)


# Conv widths, "M" for a 2x2 max pool (Simonyan & Zisserman, configurations A and D).
VGG_LAYOUTS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ),
    "test": (8, "M", 16, "M", 32, "M"),
}


class VGG(ClassifierModel):
    """VGG with batch norm and a global-pool + linear head instead of the 4096-wide MLP.

    The conv stack is the paper's; dropping the two 4096 layers takes VGG-16 from 138M to 14.7M
    parameters, as in the usual CIFAR variants, and lets one model serve 32x32 and 224x224.
    """

    def __init__(
        self,
        layout: tuple[int | str, ...],
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        act: str = "relu",
    ) -> None:
        super().__init__()
        layers, chs, last_conv = [], in_chans, 0
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers.append(ConvBNAct(chs, int(item), 3, act=act))
                chs, last_conv = int(item), len(layers) - 1
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(chs, num_classes, drop_rate=drop_rate)
        self.num_classes = num_classes
        self.default_cfg = base_cfg(in_chans, f"features.{last_conv}")
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, in_chans, H, W) -> (B, 512, H/32, W/32)


@register_model(input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD)
def simple_cnn(**kwargs) -> SimpleCNN:
    return SimpleCNN(**kwargs)


@register_model(input_size=(1, 28, 28), mean=MNIST_MEAN, std=MNIST_STD)
def lenet5(**kwargs) -> LeNet5:
    return LeNet5(**kwargs)


@register_model
def vgg11_bn(**kwargs) -> VGG:
    return VGG(VGG_LAYOUTS["vgg11"], **kwargs)


@register_model
def vgg16_bn(**kwargs) -> VGG:
    return VGG(VGG_LAYOUTS["vgg16"], **kwargs)


@register_model(input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD)
def vgg11_bn_cifar(**kwargs) -> VGG:
    return VGG(VGG_LAYOUTS["vgg11"], **kwargs)


@register_model(input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD)
def vgg16_bn_cifar(**kwargs) -> VGG:
    return VGG(VGG_LAYOUTS["vgg16"], **kwargs)


@register_model(input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD)
def test_simple_cnn(**kwargs) -> SimpleCNN:
    kwargs.setdefault("widths", (8, 16))
    kwargs.setdefault("depth", 1)
    return SimpleCNN(**kwargs)


@register_model(input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD)
def test_vgg(**kwargs) -> VGG:
    return VGG(VGG_LAYOUTS["test"], **kwargs)
