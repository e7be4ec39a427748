"""Decoder heads on any backbone for segmentation: ``fpn:<backbone>`` and ``deeplab:<backbone>``.

The backbone is any name ``create_model`` takes (``fpn:resnet18_slim``, ``deeplab:tv:resnet18``,
``fpn:timm:efficientnet_b0``); its maps at strides 4/8/16/32 come from ``features.py``.
``--pretrained`` gives the backbone its published weights (``tv:``/``timm:``), and a
classifier's model file given with ``--weights`` fills the backbone (its head is left out).

- ``fpn``: an FPN top-down path in the U-Net manner (Lin et al. 2017): each map through a 1x1
  ConvBNAct to ``decoder_width`` channels, added to the coarser level upsampled to its size, then
  a 3x3 ConvBNAct; the finest level (stride 4) is the decoder's output.
- ``deeplab``: DeepLabv3+ (Chen et al. 2018): ASPP on the coarsest map (a 1x1 branch, a 3x3
  branch per rate in ``aspp_rates``, image pooling), projected to ``decoder_width``, upsampled to
  the stride-4 map and joined with it (through a 1x1 conv to 48 channels), then two 3x3
  ConvBNAct. The rates default to (3, 6, 9), half the paper's (6, 12, 18) at output stride 16,
  because the backbones here end at stride 32.

Either way a 1x1 conv makes the logits at stride 4 and ``forward`` upsamples them (bilinear) to
the input's size, any size (72x56 too). The head (``get_classifier``) is the decoder and that
conv, so ``--freeze-epochs`` and ``optim.body_lr_mult`` treat the new decoder as the head;
``reset_classifier`` replaces the conv only. Options other than ``decoder_width`` and
``aspp_rates`` go to the backbone (e.g. ``width_mult`` of mobilenetv2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.models._registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    create_model,
    model_task,
    register_head,
)
from cnnkit.models.features import FeatureInfo, timm_features, traced_features
from cnnkit.models.layers import ClassifierModel, ConvBNAct, fit_channels, init_weights
from cnnkit.models.unet import SegmentationHead

LOW_LEVEL_CHANNELS = 48  # DeepLabv3+'s reduction of the stride-4 map before the join


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class FPNDecoder(nn.Module):
    """Maps (fine to coarse, ``channels``) -> (B, width, H/4, W/4)."""

    def __init__(self, channels: list[int], width: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(ConvBNAct(c, width, 1) for c in channels)
        self.smooth = nn.ModuleList(ConvBNAct(width, width, 3) for _ in channels)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        x = self.smooth[-1](self.lateral[-1](maps[-1]))
        for i in range(len(maps) - 2, -1, -1):  # coarse to fine
            x = self.smooth[i](self.lateral[i](maps[i]) + _resize(x, maps[i]))
        return x


class ASPP(nn.Module):
    """(B, C, h, w) -> (B, width, h, w): parallel 1x1, dilated 3x3 and image-pool branches."""

    def __init__(self, in_chs: int, width: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBNAct(in_chs, width, 1)] + [ConvBNAct(in_chs, width, 3, dilation=r) for r in rates]
        )
        # no batch norm on the pooled branch: a batch of 1 gives it a single value per channel
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNAct(in_chs, width, 1, norm=False))
        self.project = ConvBNAct(width * (len(rates) + 2), width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.project(torch.cat(outs, dim=1))


class DeepLabDecoder(nn.Module):
    """Maps (fine to coarse) -> (B, width, H/4, W/4): ASPP on the coarsest, joined with the
    finest."""

    def __init__(self, channels: list[int], width: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.aspp = ASPP(channels[-1], width, rates)
        self.low = ConvBNAct(channels[0], LOW_LEVEL_CHANNELS, 1)
        self.fuse = nn.Sequential(
            ConvBNAct(width + LOW_LEVEL_CHANNELS, width, 3), ConvBNAct(width, width, 3)
        )

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        low = self.low(maps[0])
        return self.fuse(torch.cat([_resize(self.aspp(maps[-1]), low), low], dim=1))


class DecoderHead(nn.Module):
    """A decoder and the 1x1 conv to logits: maps -> (B, K, H/4, W/4) (``pre_logits``: the
    decoder's (B, width, H/4, W/4))."""

    def __init__(self, decoder: nn.Module, width: int, num_classes: int) -> None:
        super().__init__()
        self.decoder = decoder
        self.classifier = SegmentationHead(width, num_classes)
        self.num_features = width

    def forward(self, maps: list[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        return self.classifier(self.decoder(maps), pre_logits)

    def reset(self, num_classes: int) -> None:
        self.classifier.reset(num_classes)


class DenseModel(ClassifierModel):
    """A backbone's feature maps and a decoder head: (B, in_chans, H, W) -> (B, K, H, W).

    ``forward_features`` gives the backbone's maps (a list, fine to coarse), ``forward_head``
    the logits at stride 4, ``forward`` those upsampled to the input's size."""

    def __init__(
        self, backbone: FeatureInfo, head: DecoderHead, num_classes: int, cfg: dict
    ) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.num_classes = num_classes
        self.default_cfg = cfg
        init_weights(self.head)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _resize(self.head(self.backbone(x)), x)


def _backbone(name: str, in_chans: int, pretrained: bool, kwargs: dict) -> tuple:
    """(FeatureInfo, the backbone's default_cfg, the keys of its state dict left out)."""
    if model_task(name) != "classification":
        raise CnnkitError(f"the backbone of a head must be a classifier, not '{name}'")
    if name.startswith("timm:"):
        features = timm_features(name[len("timm:") :], in_chans, pretrained, **kwargs)
        cfg = _timm_cfg(features.body, in_chans)
        return features, cfg, ()
    model = create_model(name, in_chans=in_chans, pretrained=pretrained, **kwargs)
    features = traced_features(model, name)
    dropped = model.state_dict().keys() - features.body.state_dict().keys()
    return features, dict(model.default_cfg), tuple(sorted(dropped))


def _timm_cfg(body: nn.Module, in_chans: int) -> dict:
    cfg = dict(getattr(body, "pretrained_cfg", None) or {})
    size = tuple(cfg.get("input_size", (3, 224, 224)))[1:]
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    return {"input_size": (in_chans, *size), "mean": mean, "std": std}


def _dense_model(
    head: str, backbone: str, num_classes: int, in_chans: int, pretrained: bool,
    make_decoder, width: int, kwargs: dict,
) -> DenseModel:  # fmt: skip
    if not isinstance(width, int) or width < 1:
        raise CnnkitError(f"{head}: decoder_width must be an integer >= 1, got {width!r}")
    features, cfg, dropped = _backbone(backbone, in_chans, pretrained, kwargs)
    decoder = DecoderHead(make_decoder(features.channels), width, num_classes)
    model = DenseModel(
        features, decoder, num_classes,
        {
            "architecture": f"{head}:{backbone}",
            "input_size": (in_chans, *cfg["input_size"][1:]),
            "mean": fit_channels(tuple(cfg["mean"]), in_chans),
            "std": fit_channels(tuple(cfg["std"]), in_chans),
            "feature_layer": "head.decoder",
            "classifier": "head",
        },
    )  # fmt: skip
    # A classifier's weights file fills the backbone: its keys gain this prefix, its head drops.
    model.inner_prefix = "backbone.body."
    model.ignored_keys = tuple(f"backbone.body.{k}" for k in dropped)
    return model


@register_head("fpn:")
def fpn(
    backbone: str, num_classes: int, in_chans: int, pretrained: bool,
    decoder_width: int = 64, **kwargs,
) -> DenseModel:  # fmt: skip
    """FPN decoder (see the module docstring) on ``backbone``."""

    def make(channels: list[int]) -> nn.Module:
        return FPNDecoder(channels, decoder_width)

    return _dense_model(
        "fpn", backbone, num_classes, in_chans, pretrained, make, decoder_width, kwargs
    )


@register_head("deeplab:")
def deeplab(
    backbone: str, num_classes: int, in_chans: int, pretrained: bool,
    decoder_width: int = 128, aspp_rates: tuple[int, ...] = (3, 6, 9), **kwargs,
) -> DenseModel:  # fmt: skip
    """DeepLabv3+ decoder (see the module docstring) on ``backbone``."""
    rates = tuple(int(r) for r in aspp_rates)
    if not rates or min(rates) < 1:
        raise CnnkitError(f"deeplab: aspp_rates must be integers >= 1, got {aspp_rates!r}")

    def make(channels: list[int]) -> nn.Module:
        return DeepLabDecoder(channels, decoder_width, rates)

    return _dense_model(
        "deeplab", backbone, num_classes, in_chans, pretrained, make, decoder_width, kwargs
    )
