"""MobileNetV2 (Sandler et al. 2018): inverted residuals with linear bottlenecks.

At width 1.0 and 1000 classes it has torchvision's 3.50M parameters and 0.30 GMACs at 224x224.
``width_mult`` scales every layer's channels (rounded to multiples of 8, as in the paper); the
last 1x1 conv keeps at least 1280 channels below width 1.0.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.models._registry import CIFAR_MEAN, CIFAR_STD, register_model
from cnnkit.models.layers import (
    ClassifierHead,
    ClassifierModel,
    ConvBNAct,
    InvertedResidual,
    base_cfg,
    init_weights,
)

# (expand ratio t, output channels c, repeats n, first stride s) per stage, from the paper.
MOBILENETV2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_TEST_STAGES = ((1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 1, 2))


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going down more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class MobileNetV2(ClassifierModel):
    """Stem conv (stride 2) -> inverted residual stages -> 1x1 conv -> pool -> dropout -> linear."""

    def __init__(
        self,
        stages: tuple[tuple[int, int, int, int], ...],
        stem_width: int,
        last_width: int,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        drop_rate: float = 0.2,
        act: str = "relu6",
    ) -> None:
        super().__init__()
        if not width_mult > 0:
            raise CnnkitError(f"width_mult must be > 0, got {width_mult!r}")
        chs = make_divisible(stem_width * width_mult)
        layers = [ConvBNAct(in_chans, chs, 3, 2, act=act)]
        for t, c, n, s in stages:
            out = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(chs, out, s if i == 0 else 1, t, act))
                chs = out
        last = make_divisible(last_width * max(1.0, width_mult))
        layers.append(ConvBNAct(chs, last, 1, act=act))
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(last, num_classes, drop_rate=drop_rate)
        self.num_classes = num_classes
        self.default_cfg = base_cfg(in_chans, f"features.{len(layers) - 1}")
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, in_chans, H, W) -> (B, last_width, H/32, W/32)


@register_model
def mobilenetv2(**kwargs) -> MobileNetV2:
    return MobileNetV2(MOBILENETV2_STAGES, 32, 1280, **kwargs)


@register_model(input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD)
def test_mobilenetv2(**kwargs) -> MobileNetV2:
    return MobileNetV2(_TEST_STAGES, 8, 64, **kwargs)
