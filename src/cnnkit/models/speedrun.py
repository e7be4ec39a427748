"""speedrun_net: the small VGG-like network of the CIFAR-10 speed-training line of work.

Written from the published techniques, not from anyone's code:

- David Page, "How to train your ResNet" (blog series, myrtle.ai, 2018): a shallow net of
  conv-pool-BN blocks, a frozen batch-norm scale, a scaled-down final linear layer, label
  smoothing and a large raised learning rate for the batch-norm biases.
- tysam-code, hlb-CIFAR10 (2022-2023): a first convolution whose weights are the whitening
  transform of 2x2 image patches (eigenvectors of the patch covariance, in +/- pairs), kept frozen.
- Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU" (airbench, arXiv 2404.00498):
  GELU, identity (Dirac) initialisation of the 3x3 convolutions, widths 64-256-256, a global max
  pool and logits scaled by 1/9, trained with Nesterov SGD at batch 1024, lookahead, alternating
  flips and multi-crop test-time augmentation (the training side is ``cnnkit.recipes``).

Layout at 32x32 (airbench94's): whiten 2x2 (C -> 2*4C, 31x31) -> GELU -> three groups of
[conv3x3 -> maxpool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU] (31 -> 15 -> 7 -> 3) -> global max
pool -> linear without bias -> x 1/9. About 0.24 GFLOP per 32x32 image forward at widths
64-256-256 (0.06 at 32-128-128).

The whitening weights come from data: ``init_from_data(images)`` (``fit`` calls it once before
the first epoch). They are a buffer, not a parameter, so nothing trains them; the whitening bias
does train (airbench trains it only for the first epochs, a detail left out here).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.models._registry import CIFAR_MEAN, CIFAR_STD, register_model
from cnnkit.models.layers import ClassifierModel, base_cfg

WHITEN_EPS = 5e-4  # added to the patch-covariance eigenvalues: tames the noisiest directions


class Whitening(nn.Module):
    """A frozen ``k`` x ``k`` convolution, no padding, that whitens image patches.

    Output channels ``2 * C*k*k``: each eigenvector of the patch covariance scaled by
    1/sqrt(eigenvalue + eps), then the same filters negated, so the GELU after it keeps both
    signs of every direction. The bias (trainable) starts at -W @ patch mean: centred outputs.
    """

    def __init__(self, in_chans: int, kernel_size: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        dim = in_chans * kernel_size**2
        self.register_buffer("weight", torch.zeros(2 * dim, in_chans, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(2 * dim))

    @property
    def is_set(self) -> bool:
        """True once filters were computed or loaded (fresh ones are all zero)."""
        return bool(self.weight.abs().sum() > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N * H' * W', C*k*k), flattened in the conv weight's (C, k, k) order."""
        k = self.kernel_size
        cols = images.unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H', W', k, k)
        return cols.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * k * k)

    @torch.no_grad()
    def fit(self, images: torch.Tensor, eps: float = WHITEN_EPS) -> None:
        """Set the filters from a float batch (N, C, H, W) of what ``forward`` will receive."""
        patches = self.patches(images.double())
        mean = patches.mean(0)
        cov = torch.cov(patches.T, correction=0)  # (D, D)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending; columns are vectors
        filters = (eigenvectors / (eigenvalues.clamp_min(0) + eps).sqrt()).T.flip(0)  # (D, D)
        weight = torch.cat([filters, -filters])  # (2D, D): strongest directions first
        self.weight.copy_(weight.reshape(self.weight.shape).to(self.weight.dtype))
        self.bias.copy_(-(weight @ mean).to(self.bias.dtype))


class FixedScaleBatchNorm(nn.BatchNorm2d):
    """Batch norm whose scale stays 1 (no parameter) while its shift trains, as Page found best."""

    def __init__(self, num_features: int, momentum: float = 0.4, eps: float = 1e-12) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=False)
        self.bias = nn.Parameter(torch.zeros(num_features))


class ConvGroup(nn.Sequential):
    """conv3x3 -> maxpool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU; identity-initialised convs."""

    def __init__(self, in_chs: int, out_chs: int, bn_momentum: float) -> None:
        conv1 = nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False)
        conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        super().__init__(
            OrderedDict(
                conv1=conv1,
                pool=nn.MaxPool2d(2),
                bn1=FixedScaleBatchNorm(out_chs, bn_momentum),
                act1=nn.GELU(),
                conv2=conv2,
                bn2=FixedScaleBatchNorm(out_chs, bn_momentum),
                act2=nn.GELU(),
            )
        )
        for conv in (conv1, conv2):
            dirac_init(conv)


@torch.no_grad()
def dirac_init(conv: nn.Conv2d) -> None:
    """Make the first ``in_channels`` filters pass their input channel through unchanged (the
    rest keep PyTorch's default init), so a fresh deep stack starts close to an identity map."""
    n = min(conv.in_channels, conv.out_channels)
    nn.init.dirac_(conv.weight[:n])


class ScaledLinearHead(nn.Module):
    """Global max pool -> linear without bias -> x ``scale`` (1/9 keeps early logits small)."""

    def __init__(self, in_chs: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.num_features, self.scale = in_chs, scale
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten(1)
        self.reset(num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.flatten(self.pool(x))  # (B, C)
        return x if pre_logits else self.fc(x) * self.scale

    def reset(self, num_classes: int) -> None:
        fc = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else None
        self.fc = fc if fc is not None else nn.Identity()


class SpeedrunNet(ClassifierModel):
    """Whitening conv -> GELU -> one ``ConvGroup`` per width -> ``ScaledLinearHead``."""

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        widths: tuple[int, ...] = (64, 256, 256),
        whiten_kernel: int = 2,
        bn_momentum: float = 0.4,  # PyTorch convention: airbench's 0.6 "keep" is 0.4 here
        head_scale: float = 1 / 9,
    ) -> None:
        super().__init__()
        whiten = Whitening(in_chans, whiten_kernel)
        layers, chs = [whiten, nn.GELU()], whiten.weight.shape[0]
        for width in widths:
            layers.append(ConvGroup(chs, int(width), bn_momentum))
            chs = int(width)
        self.features = nn.Sequential(*layers)
        self.head = ScaledLinearHead(chs, num_classes, head_scale)
        self.num_classes = num_classes
        self.default_cfg = base_cfg(in_chans, f"features.{len(layers) - 1}", (32, 32))

    @property
    def whiten(self) -> Whitening:
        return self.features[0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, C, 32, 32) -> (B, widths[-1], 3, 3)

    def init_from_data(self, images: torch.Tensor, force: bool = False) -> None:
        """Compute the whitening filters from a batch of training images (N, C, H, W).

        Give float images normalised as ``forward`` receives them (``fit`` does), or uint8
        images, which are normalised here with ``default_cfg``'s mean and std. A few thousand
        images are plenty (airbench uses 5000). Filters already set (weights loaded from a
        file) are kept unless ``force``.
        """
        if images.ndim != 4 or images.shape[1] != self.whiten.weight.shape[1]:
            raise CnnkitError(
                f"init_from_data needs images (N, {self.whiten.weight.shape[1]}, H, W), "
                f"got shape {tuple(images.shape)}"
            )
        if self.whiten.is_set and not force:
            return
        if images.dtype == torch.uint8:
            mean = torch.tensor(self.default_cfg["mean"]).view(1, -1, 1, 1)
            std = torch.tensor(self.default_cfg["std"]).view(1, -1, 1, 1)
            images = (images.float() / 255 - mean.to(images.device)) / std.to(images.device)
        self.whiten.fit(images)


@register_model(input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD)
def speedrun_net(**kwargs) -> SpeedrunNet:
    return SpeedrunNet(**kwargs)


@register_model(input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD)
def test_speedrun_net(**kwargs) -> SpeedrunNet:
    kwargs.setdefault("widths", (8, 16, 16))
    return SpeedrunNet(**kwargs)
