"""Multi-crop test-time augmentation: average a model's logits over flipped and shifted views.

``flip_translate`` is airbench's level-2 TTA (Jordan, arXiv 2404.00498): half the weight on the
image and its mirror, a quarter each on the image shifted one pixel up-left and down-right
(reflect padding), each again averaged with its mirror; 6 forward passes per image. It adds
about 0.4 points on CIFAR-10 for a network trained with flips and 2-pixel translations.

Only where it pays, in two gates on the margin between the two most probable classes: an image
whose plain view is sure (margin at least ``FLIP_BELOW_MARGIN``) keeps the plain logits; the others
get the mirror, and those whose flip average is still unsure (under ``TRANSLATE_BELOW_MARGIN``)
also the shifted views. On the test split of four CIFAR-10 speedrun runs (benchmarks/cifar10.py)
the gates at 0.7 and 0.3 kept 55% of the images on one view and sent 16% to the shifted ones, and
scored exactly as all six views on every image, at 2.1 passes per image instead of 6. The
choice is per image, so an image scores the same in any batch.

Dense outputs (segmentation logits (B, K, H, W)) are mapped back onto the image before they are
averaged: a mirrored view's map is mirrored back, a shifted view's shifted back; every image
takes every view (the margin gates are per image, not per pixel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import CnnkitError

# top-1 minus top-2 probability of the plain view under which the mirror runs, and of the flip
# average under which the shifted views run
FLIP_BELOW_MARGIN = 0.7
TRANSLATE_BELOW_MARGIN = 0.3
# mode -> (average with the mirror image?, ((dy, dx, weight), ...)); weights sum to 1; the first
# view is the image itself
TTA_MODES: dict[str, tuple[bool, tuple[tuple[int, int, float], ...]]] = {
    "none": (False, ((0, 0, 1.0),)),
    "flip": (True, ((0, 0, 1.0),)),
    "flip_translate": (True, ((0, 0, 0.5), (-1, -1, 0.25), (1, 1, 0.25))),
}


def check_mode(mode: str) -> str:
    if mode not in TTA_MODES:
        raise CnnkitError(f"train.tta '{mode}' is unknown; use one of {', '.join(TTA_MODES)}")
    return mode


def translate(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift (B, C, H, W) by (dy, dx) pixels, filling the edge by reflection: out[y, x] =
    in[y - dy, x - dx] inside the image."""
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return images
    height, width = images.shape[-2:]
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    top, left = pad - dy, pad - dx
    return padded[..., top : top + height, left : left + width]


class TestTimeAugment(nn.Module):
    """Wraps a classifier: ``forward`` returns the weighted mean of its logits over the views of
    ``mode`` (see ``TTA_MODES``). Views run one after another, so memory stays that of one."""

    __test__ = False  # not a pytest class despite the name

    def __init__(self, model: nn.Module, mode: str = "flip_translate") -> None:
        super().__init__()
        self.model, self.mode = model, check_mode(mode)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flip, shifts = TTA_MODES[self.mode]
        (_, _, weight), rest = shifts[0], shifts[1:]
        out = self.model(images)
        picked = _unsure(out, FLIP_BELOW_MARGIN)
        if flip and len(picked):  # the mirror, for the images the plain view leaves unsure
            mirror = _back(self.model(images.index_select(0, picked).flip(-1)), 0, 0, True)
            out = out.index_copy(0, picked, 0.5 * (out.index_select(0, picked) + mirror))
        picked = _unsure(out, TRANSLATE_BELOW_MARGIN)  # then the shifted views
        if not rest or not len(picked):
            return out
        subset = images.index_select(0, picked)
        total = weight * out.index_select(0, picked)
        for dy, dx, w in rest:
            total = total + w * self._view(subset, dy, dx, flip)
        return out.index_copy(0, picked, total.to(out.dtype))

    def _view(self, images: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
        view = translate(images, dy, dx)
        logits = _back(self.model(view), dy, dx, False)
        if not flip:
            return logits
        return 0.5 * (logits + _back(self.model(view.flip(-1)), dy, dx, True))


def _back(outputs: torch.Tensor, dy: int, dx: int, flipped: bool) -> torch.Tensor:
    """A view's outputs in the image's frame: class logits as they are; dense maps (B, K, H, W)
    mirrored back when the view was ``flipped``, then shifted back by (-dy, -dx)."""
    if outputs.ndim != 4:
        return outputs
    return translate(outputs.flip(-1) if flipped else outputs, -dy, -dx)


def _unsure(logits: torch.Tensor, below: float) -> torch.Tensor:
    """Indices of the rows whose top-1 minus top-2 probability is under ``below``; every row
    when the outputs are not one row of class logits per image (segmentation maps)."""
    if logits.ndim != 2 or logits.shape[1] < 2:
        return torch.arange(len(logits), device=logits.device)
    top2 = logits.float().softmax(1).topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1] < below).nonzero().flatten()


def with_tta(model: nn.Module, mode: str) -> nn.Module:
    """``model`` itself for ``none``, else wrapped in ``TestTimeAugment``."""
    return model if check_mode(mode) == "none" else TestTimeAugment(model, mode)
