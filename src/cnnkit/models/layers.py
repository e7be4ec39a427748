"""The seed components every zoo model is built from, and the base class of the classifier contract.

Blocks: ``ConvBNAct`` (conv -> batch norm -> activation), ``BasicBlock`` and ``Bottleneck``
(ResNet), ``InvertedResidual`` (MobileNetV2) and ``ClassifierHead`` (pool -> flatten -> optional
hidden layers -> dropout -> linear). Activations and pools are picked by name from tables, so a
builder or a layer spec says ``act="silu"`` instead of importing a class.

Activations are never in-place: Grad-CAM hooks the output of ``feature_layer`` and the backward
hooks PyTorch offers refuse modules that overwrite their inputs.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from cnnkit.errors import CnnkitError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "hardswish": nn.Hardswish,
    "mish": nn.Mish,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}

# Global pools take the output side (1 for global pooling, N for an N x N map before flatten).
POOLS: dict[str, Callable[[int], nn.Module]] = {
    "avg": nn.AdaptiveAvgPool2d,
    "max": nn.AdaptiveMaxPool2d,
}


def _pick(table: dict, name: str, what: str):
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), list(table), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise CnnkitError(f"unknown {what} '{name}'.{hint} Choose one of: {', '.join(table)}")


def make_act(name: str | None) -> nn.Module:
    """Activation module by name (``None`` or ``"identity"``: no activation)."""
    return nn.Identity() if name is None else _pick(ACTIVATIONS, name, "activation")()


def make_pool(name: str, output_size: int = 1) -> nn.Module:
    """Adaptive pool by name (``avg`` | ``max``) to an ``output_size`` x ``output_size`` map."""
    return _pick(POOLS, name, "pool")(output_size)


class ConvBNAct(nn.Sequential):
    """Conv2d -> BatchNorm2d -> activation, any kernel/stride/padding/groups/dilation.

    ``padding=None`` keeps the size at stride 1 (``dilation * (kernel - 1) // 2``); the conv has a
    bias only when there is no norm after it (the norm's shift makes a bias redundant).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        dilation: int = 1,
        norm: bool = True,
        act: str | None = "relu",
        bias: bool | None = None,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2 if padding is None else padding
        bias = not norm if bias is None else bias
        conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias)
        bn = nn.BatchNorm2d(out_chs) if norm else nn.Identity()
        super().__init__(OrderedDict(conv=conv, bn=bn, act=make_act(act)))
        self.out_chs = out_chs


class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut (ResNet-18/34, CIFAR ResNets). Output channels: ``width``."""

    expansion = 1

    def __init__(self, in_chs: int, width: int, stride: int = 1, act: str = "relu") -> None:
        super().__init__()
        out_chs = width * self.expansion
        self.conv1 = ConvBNAct(in_chs, width, 3, stride, act=act)
        self.conv2 = ConvBNAct(width, out_chs, 3, act=None)
        self.shortcut = _shortcut(in_chs, out_chs, stride)
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))

    def zero_init_last(self) -> None:
        """Start as an identity map: the residual branch outputs zeros until it learns."""
        nn.init.zeros_(self.conv2.bn.weight)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride, as in ResNet v1.5) -> 1x1 expand, plus a shortcut.

    Output channels: ``width * 4`` (ResNet-50 and deeper).
    """

    expansion = 4

    def __init__(self, in_chs: int, width: int, stride: int = 1, act: str = "relu") -> None:
        super().__init__()
        out_chs = width * self.expansion
        self.conv1 = ConvBNAct(in_chs, width, 1, act=act)
        self.conv2 = ConvBNAct(width, width, 3, stride, act=act)
        self.conv3 = ConvBNAct(width, out_chs, 1, act=None)
        self.shortcut = _shortcut(in_chs, out_chs, stride)
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))

    def zero_init_last(self) -> None:
        """Start as an identity map: the residual branch outputs zeros until it learns."""
        nn.init.zeros_(self.conv3.bn.weight)


def _shortcut(in_chs: int, out_chs: int, stride: int) -> nn.Module:
    """Identity when shapes agree, else a strided 1x1 projection with batch norm."""
    if stride == 1 and in_chs == out_chs:
        return nn.Identity()
    return ConvBNAct(in_chs, out_chs, 1, stride, act=None)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> linear 1x1 project (+ shortcut)."""

    def __init__(
        self, in_chs: int, out_chs: int, stride: int, expand_ratio: float, act: str = "relu6"
    ) -> None:
        super().__init__()
        hidden = round(in_chs * expand_ratio)
        expand = ConvBNAct(in_chs, hidden, 1, act=act) if expand_ratio != 1 else nn.Identity()
        self.conv = nn.Sequential(
            OrderedDict(
                expand=expand,
                depthwise=ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=act),
                project=ConvBNAct(hidden, out_chs, 1, act=None),  # linear bottleneck: no act
            )
        )
        self.use_shortcut = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_shortcut else out


class ClassifierHead(nn.Module):
    """Pool (B,C,H,W) -> (B,C*s*s) -> optional hidden layers -> dropout -> linear (B,classes).

    ``pool_size`` 1 is global pooling; a larger size keeps an s x s map before flattening (LeNet's
    5x5). ``hidden`` is any module mapping the flat features to ``hidden_features`` (an MLP).
    ``num_classes`` 0 leaves ``fc`` an identity, so the head returns the pre-logit features.
    """

    def __init__(
        self,
        in_chs: int,
        num_classes: int,
        pool: str = "avg",
        drop_rate: float = 0.0,
        pool_size: int = 1,
        hidden: nn.Module | None = None,
        hidden_features: int | None = None,
    ) -> None:
        super().__init__()
        self.pool = make_pool(pool, pool_size)
        self.flatten = nn.Flatten(1)
        self.hidden = hidden if hidden is not None else nn.Identity()
        self.num_features = hidden_features if hidden is not None else in_chs * pool_size**2
        self.drop = nn.Dropout(drop_rate)
        self.fc = _linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.hidden(self.flatten(self.pool(x))))
        return x if pre_logits else self.fc(x)

    def reset(self, num_classes: int) -> None:
        """Replace the final linear layer with a fresh one for ``num_classes`` outputs."""
        self.fc = _linear(self.num_features, num_classes)


def _linear(in_features: int, num_classes: int) -> nn.Module:
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


class ClassifierModel(nn.Module):
    """Base of every zoo model: ``forward_features`` -> ``head``, with the classifier contract.

    Subclasses build ``self.head`` (a ``ClassifierHead``), set ``num_classes`` and
    ``default_cfg`` and implement ``forward_features``. The registry fills the ``input_size``,
    ``mean`` and ``std`` of ``default_cfg`` from the builder's registration. (No class-level
    annotations for those attributes: TorchScript would try to resolve them.)
    """

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, h, w) feature map."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (B, num_classes), or the pooled features when ``pre_logits``."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The head module: what fine-tuning trains first and what a class-count change resets."""
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Give the model a fresh final layer for ``num_classes`` outputs (0: features only)."""
        self.head.reset(num_classes)
        self.num_classes = num_classes

    @property
    def num_features(self) -> int:
        return self.head.num_features


def base_cfg(in_chans: int, feature_layer: str, input_hw: tuple[int, int] = (224, 224)) -> dict:
    """``default_cfg`` of a model built directly (the registry overrides size, mean and std)."""
    return {
        "input_size": (in_chans, *input_hw),
        "mean": (0.5,) * in_chans,
        "std": (0.5,) * in_chans,
        "feature_layer": feature_layer,
        "classifier": "head",
    }


def fit_channels(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """Per-channel stats for ``in_chans``: as given when they fit, else their mean repeated."""
    if len(values) == in_chans:
        return tuple(values)
    return (round(sum(values) / len(values), 4),) * in_chans


def init_weights(model: nn.Module) -> None:
    """He init for convs (fan-out, ReLU gain), unit/zero batch norm; linear layers keep PyTorch's.

    Linear layers keep the default init so a head reset by ``reset_classifier`` starts the same way
    as a freshly built one.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
