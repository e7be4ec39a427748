"""ResNets (He et al. 2015): ImageNet ones (7x7 stem + max pool) and CIFAR ones (3x3 stem).

resnet18/34/50 have exactly torchvision's parameter counts (11.7M / 21.8M / 25.6M at 1000
classes); resnet20/32/56 are the paper's CIFAR nets (widths 16-32-64) with 1x1 projection
shortcuts; resnet18_cifar is ResNet-18 with a 3x3 stride-1 stem for 32x32 images (11.2M).
The last batch norm of each residual branch starts at zero (``zero_init_residual``), so every
block begins as an identity map, which trains faster and more stably from scratch.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.models._registry import CIFAR_MEAN, CIFAR_STD, register_model
from cnnkit.models.layers import (
    BasicBlock,
    Bottleneck,
    ClassifierHead,
    ClassifierModel,
    ConvBNAct,
    base_cfg,
    init_weights,
)


def _imagenet_stem(in_chans: int, width: int, act: str) -> nn.Module:
    """7x7 stride-2 conv + 3x3 stride-2 max pool: 224x224 -> 56x56."""
    return nn.Sequential(ConvBNAct(in_chans, width, 7, 2, act=act), nn.MaxPool2d(3, 2, 1))


def _cifar_stem(in_chans: int, width: int, act: str) -> nn.Module:
    """One 3x3 stride-1 conv: small images keep their resolution."""
    return ConvBNAct(in_chans, width, 3, 1, act=act)


def _deep_stem(in_chans: int, width: int, act: str) -> nn.Module:
    """Three 3x3 convs (the first stride 2) + 3x3 stride-2 max pool, "ResNet-C" of Bag of
    Tricks (He et al. 2019): the same /4 as the 7x7 stem, cheaper and a little more accurate."""
    half = max(width // 2, 8)
    return nn.Sequential(
        ConvBNAct(in_chans, half, 3, 2, act=act),
        ConvBNAct(half, half, 3, 1, act=act),
        ConvBNAct(half, width, 3, 1, act=act),
        nn.MaxPool2d(3, 2, 1),
    )


STEMS = {"imagenet": _imagenet_stem, "cifar": _cifar_stem, "deep": _deep_stem}
BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(ClassifierModel):
    """Stem -> stages of residual blocks (stride 2 at the start of every stage but the first)
    -> global average pool -> dropout -> linear."""

    def __init__(
        self,
        block: str,
        depths: tuple[int, ...],
        widths: tuple[int, ...],
        stem: str,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        act: str = "relu",
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if block not in BLOCKS or stem not in STEMS:
            raise CnnkitError(
                f"ResNet block must be one of {list(BLOCKS)}, stem one of {list(STEMS)}"
            )
        block_cls = BLOCKS[block]
        self.stem = STEMS[stem](in_chans, widths[0], act)
        stages, chs = [], widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block_cls(chs, width, stride, act))
                chs = width * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(chs, num_classes, drop_rate=drop_rate)
        self.num_classes = num_classes
        self.default_cfg = base_cfg(in_chans, f"stages.{len(stages) - 1}")
        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock | Bottleneck):
                    m.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # (B, in_chans, H, W) -> (B, widths[-1] * expansion, H/32, W/32) with the ImageNet stem
        return self.stages(self.stem(x))


_IMAGENET_WIDTHS = (64, 128, 256, 512)
_CIFAR_WIDTHS = (16, 32, 64)
# Half ResNet-18's widths: on a 2-core CPU at 128 px a quarter of the FLOPs matters more than
# the capacity for a few hundred to a few thousand photos (benchmarks/photos.py).
_SLIM_WIDTHS = (32, 64, 128, 256)
_CIFAR = {"input_size": (3, 32, 32), "mean": CIFAR_MEAN, "std": CIFAR_STD}


@register_model
def resnet18(**kwargs) -> ResNet:
    return ResNet("basic", (2, 2, 2, 2), _IMAGENET_WIDTHS, "imagenet", **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    return ResNet("basic", (3, 4, 6, 3), _IMAGENET_WIDTHS, "imagenet", **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    return ResNet("bottleneck", (3, 4, 6, 3), _IMAGENET_WIDTHS, "imagenet", **kwargs)


@register_model(input_size=(3, 128, 128))
def resnet10_slim(**kwargs) -> ResNet:
    return ResNet("basic", (1, 1, 1, 1), _SLIM_WIDTHS, "deep", **kwargs)


@register_model(input_size=(3, 128, 128))
def resnet18_slim(**kwargs) -> ResNet:
    return ResNet("basic", (2, 2, 2, 2), _SLIM_WIDTHS, "deep", **kwargs)


@register_model(**_CIFAR)
def resnet18_cifar(**kwargs) -> ResNet:
    return ResNet("basic", (2, 2, 2, 2), _IMAGENET_WIDTHS, "cifar", **kwargs)


@register_model(**_CIFAR)
def resnet20(**kwargs) -> ResNet:
    return ResNet("basic", (3, 3, 3), _CIFAR_WIDTHS, "cifar", **kwargs)


@register_model(**_CIFAR)
def resnet32(**kwargs) -> ResNet:
    return ResNet("basic", (5, 5, 5), _CIFAR_WIDTHS, "cifar", **kwargs)


@register_model(**_CIFAR)
def resnet56(**kwargs) -> ResNet:
    return ResNet("basic", (9, 9, 9), _CIFAR_WIDTHS, "cifar", **kwargs)


@register_model(**_CIFAR)
def test_resnet(**kwargs) -> ResNet:
    return ResNet("basic", (1, 1), (8, 16), "cifar", **kwargs)


@register_model(**_CIFAR)
def test_resnet_bottleneck(**kwargs) -> ResNet:
    return ResNet("bottleneck", (1, 1), (4, 8), "imagenet", **kwargs)
