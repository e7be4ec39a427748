"""U-Net (Ronneberger et al., 2015) from the seed components: per pixel class logits.

Encoder: ``depth`` stages of two 3x3 ConvBNAct, a 2x2 max pool before each stage but the first,
widths ``width * 2**i``. Decoder: per stage, up by 2 (a 2x2 transposed conv, or bilinear
upsampling then a 1x1 ConvBNAct: ``up="bilinear"``), concatenated with the encoder map of the
same size (the skip), then two 3x3 ConvBNAct. A 1x1 conv makes the logits (B, K, H, W) at the
input's resolution: inputs whose sides are not multiples of 2**(depth-1) are zero-padded on the
bottom/right first and the output cropped back.

It keeps the classifier contract's names with dense outputs: ``forward_features`` is the last
decoder map (B, width, H, W), ``forward_head`` the 1x1 conv (``pre_logits``: the map itself), and
``reset_classifier`` replaces that conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.models._registry import register_model
from cnnkit.models.layers import ClassifierModel, ConvBNAct, base_cfg, init_weights

UNET_MEAN, UNET_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # replaced by the data's own stats


class DoubleConv(nn.Sequential):
    """Two 3x3 ConvBNAct: (B, in_chs, H, W) -> (B, out_chs, H, W)."""

    def __init__(self, in_chs: int, out_chs: int, act: str = "relu") -> None:
        super().__init__(ConvBNAct(in_chs, out_chs, act=act), ConvBNAct(out_chs, out_chs, act=act))


class Up(nn.Module):
    """x (B, C, h, w) up to (B, C/2, 2h, 2w), joined with the skip (B, C/2, 2h, 2w), two convs."""

    def __init__(self, in_chs: int, out_chs: int, mode: str, act: str) -> None:
        super().__init__()
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(in_chs, out_chs, 2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                ConvBNAct(in_chs, out_chs, 1, act=act),
            )
        self.conv = DoubleConv(2 * out_chs, out_chs, act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class SegmentationHead(nn.Module):
    """1x1 conv from features (B, F, H, W) to logits (B, K, H, W); K = 0: the features."""

    def __init__(self, in_chs: int, num_classes: int) -> None:
        super().__init__()
        self.num_features = in_chs
        self.reset(num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)

    def reset(self, num_classes: int) -> None:
        self.fc = nn.Conv2d(self.num_features, num_classes, 1) if num_classes else nn.Identity()


class UNet(ClassifierModel):
    """See the module docstring (the contract's methods come from ``ClassifierModel``; the head
    is per pixel). ``width``: channels of the first stage; ``depth``: stages
    (the deepest map is 2**(depth-1) times smaller than the input)."""

    def __init__(
        self,
        *,
        num_classes: int = 2,
        in_chans: int = 3,
        width: int = 32,
        depth: int = 4,
        up: str = "transpose",
        act: str = "relu",
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1 or up not in ("transpose", "bilinear"):
            raise ValueError(f"unet needs depth >= 1, width >= 1, up transpose|bilinear: {up}")
        widths = [width * 2**i for i in range(depth)]
        self.pool = nn.MaxPool2d(2)
        self.down = nn.ModuleList()
        chs = in_chans
        for w in widths:
            self.down.append(DoubleConv(chs, w, act))
            chs = w
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i], up, act) for i in reversed(range(depth - 1))
        )
        self.decoder = nn.Identity()  # names the last decoder map, for Grad-CAM style hooks
        self.head = SegmentationHead(widths[0], num_classes)
        self.num_classes = num_classes
        self.stride = 2 ** (depth - 1)
        self.default_cfg = base_cfg(in_chans, "decoder", (64, 64))
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, width, H, W)."""
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % self.stride, 0, -h % self.stride))
        skips = []
        for i, stage in enumerate(self.down):
            x = stage(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, skip in zip(self.ups, reversed(skips[:-1]), strict=True):
            x = up(x, skip)
        return self.decoder(x[..., :h, :w])


@register_model(input_size=(3, 256, 256), mean=UNET_MEAN, std=UNET_STD, task="segmentation")
def unet(**kwargs) -> UNet:
    """The U-Net of the paper's shape at half its width: 32-64-128-256-512 (7.8M params)."""
    return UNet(**{"width": 32, "depth": 5, **kwargs})


@register_model(input_size=(3, 128, 128), mean=UNET_MEAN, std=UNET_STD, task="segmentation")
def unet_small(**kwargs) -> UNet:
    """16-32-64-128: for small data and CPUs."""
    return UNet(**{"width": 16, "depth": 4, **kwargs})


@register_model(input_size=(3, 32, 32), mean=UNET_MEAN, std=UNET_STD, task="segmentation")
def test_unet(**kwargs) -> UNet:
    return UNet(**{"width": 8, "depth": 3, **kwargs})
