"""Train and eval transforms (torchvision transforms v2), chosen by input size.

The ``preprocessing`` dict saved in the model file is all that eval and predict need:

    {"in_chans": 1|3, "input_size": [H, W], "resize": int, "crop": "center"|"none",
     "interpolation": "bilinear", "mean": [...], "std": [...]}

``crop == "center"``: resize the shorter side to ``resize`` then center-crop ``input_size``;
``crop == "none"``: resize straight to ``input_size``. Transforms take a PIL image (mode from
``image_mode``) or a uint8 tensor (C, H, W) and return a float32 tensor (C, H, W), normalised.

Train presets (each overridden by the matching ``DataConfig`` field when that is not None):

    input side     geometry                                          hflip
    < 64 px        eval resize, then random crop after zero padding  0.5 (built-ins: per dataset)
                   by pad_crop px (side // 8: 4 at 32, 1 at 8)
    >= 64 px       RandomResizedCrop, scale (0.25, 1) under 128 px,  0.5
                   (0.08, 1) from 128 px
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from cnnkit.config import DataConfig
from cnnkit.errors import CnnkitError

LARGE_INPUT = 64  # px: from this side up, train with RandomResizedCrop and eval with a center crop
CROP_RATIO = 0.875  # eval on large inputs: resize the shorter side to size / 0.875 (224 <- 256)
DEFAULT_HFLIP = 0.5

INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}
AUTO_AUGMENTS = {"none": None, "trivial": v2.TrivialAugmentWide, "rand": v2.RandAugment}


def make_preprocessing(
    in_chans: int,
    input_size: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop: str,
) -> dict:
    """The JSON-able preprocessing dict; ``crop`` "center" resizes large inputs by CROP_RATIO."""
    side = min(input_size)
    resize = round(side / CROP_RATIO) if crop == "center" and side >= LARGE_INPUT else side
    return {
        "in_chans": int(in_chans),
        "input_size": [int(input_size[0]), int(input_size[1])],
        "resize": int(resize),
        "crop": crop,
        "interpolation": "bilinear",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def image_mode(preprocessing: dict) -> str:
    """PIL mode to load images in for this preprocessing: "L" for 1 channel, else "RGB"."""
    return "L" if preprocessing["in_chans"] == 1 else "RGB"


def eval_transform(preprocessing: dict) -> v2.Compose:
    """Deterministic transform for val/test/predict: resize (+ center crop), scale, normalise.

    Its ``deterministic`` attribute is True: it may also be applied to a batch (B, C, H, W).
    """
    transform = v2.Compose(_resize_ops(preprocessing) + _tensor_ops(preprocessing))
    transform.deterministic = True
    return transform


def train_transform(preprocessing: dict, cfg: DataConfig, preset: dict | None = None) -> v2.Compose:
    """Random training transform from the size preset, the dataset ``preset`` and ``cfg``.

    ``preset`` holds dataset defaults (``hflip``, ``pad_crop``) used where ``cfg`` leaves None.
    Without any random step this is ``eval_transform(preprocessing)``.
    """
    aug = resolve_augment(preprocessing, cfg, preset)
    if not _is_random(aug):
        return eval_transform(preprocessing)
    size = tuple(preprocessing["input_size"])
    if aug["random_resized_crop"]:
        scale = (0.08, 1.0) if min(size) >= 128 else (0.25, 1.0)
        interpolation = INTERPOLATIONS[preprocessing["interpolation"]]
        ops = [v2.RandomResizedCrop(size, scale=scale, interpolation=interpolation, antialias=True)]
    else:
        ops = _resize_ops(preprocessing)
    if aug["pad_crop"] > 0:
        mode = "reflect" if aug["pad_mode"] == "reflect" else "constant"
        ops.append(v2.RandomCrop(size, padding=aug["pad_crop"], padding_mode=mode))
    if aug["hflip"]:
        # "alternate" needs the epoch, which only the batched path has: a fair coin here
        ops.append(v2.RandomHorizontalFlip(0.5 if aug["hflip"] == "alternate" else aug["hflip"]))
    if AUTO_AUGMENTS[aug["auto_augment"]] is not None:
        ops.append(AUTO_AUGMENTS[aug["auto_augment"]]())
    ops += _tensor_ops(preprocessing)
    if aug["random_erasing"] > 0:
        ops.append(v2.RandomErasing(aug["random_erasing"]))
    if aug["cutout"] > 0:
        ops.append(Cutout(aug["cutout"]))
    return v2.Compose(ops)


class Cutout:
    """Set a ``size`` x ``size`` square (clipped at the borders, centre uniform over the image)
    of a normalised (C, H, W) tensor to 0, i.e. to the mean colour (DeVries & Taylor, 2017)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        cy, cx = int(torch.randint(h, ()).item()), int(torch.randint(w, ()).item())
        top, left = max(cy - self.size // 2, 0), max(cx - self.size // 2, 0)
        image = image.clone()
        image[
            ..., top : cy - self.size // 2 + self.size, left : cx - self.size // 2 + self.size
        ] = 0
        return image


def resolve_augment(preprocessing: dict, cfg: DataConfig, preset: dict | None = None) -> dict:
    """The train augmentation actually used (JSON-able): cfg values, else preset, else by size."""
    side = min(preprocessing["input_size"])
    preset = preset or {}
    small_pad = side // 8 if side < LARGE_INPUT else 0
    aug = {
        "hflip": _pick(cfg.hflip, preset.get("hflip"), DEFAULT_HFLIP),
        "pad_crop": _pick(cfg.pad_crop, preset.get("pad_crop"), small_pad),
        "random_resized_crop": _pick(cfg.random_resized_crop, None, side >= LARGE_INPUT),
        "pad_mode": cfg.pad_mode,
        "auto_augment": cfg.auto_augment,
        "random_erasing": cfg.random_erasing,
        "cutout": cfg.cutout,
    }
    _check_augment(aug)
    return aug


class BatchMix:
    """MixUp and/or CutMix on a batch: (images (B,C,H,W), labels (B,) int64) -> (images, soft labels
    (B, num_classes) float). With ``seed`` the draw depends only on it (exact resume); without,
    it uses the global torch RNG."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if seed is None:
            return self.transform(images, labels)
        with torch.random.fork_rng(devices=[]):  # the draws are on the CPU generator only
            torch.default_generator.manual_seed(seed)
            return self.transform(images, labels)


def batch_mix(cfg: DataConfig, num_classes: int) -> BatchMix | None:
    """MixUp (``cfg.mixup`` alpha), CutMix (``cfg.cutmix`` alpha), a random choice of the two per
    batch when both are set, or None when both are 0."""
    if cfg.mixup < 0 or cfg.cutmix < 0:
        raise CnnkitError(
            f"data.mixup and data.cutmix must be >= 0 (0 turns them off), "
            f"got mixup={cfg.mixup}, cutmix={cfg.cutmix}"
        )
    mixes = []
    if cfg.mixup > 0:
        mixes.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        mixes.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    if not mixes:
        return None
    return BatchMix(mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes))


def _resize_ops(preprocessing: dict) -> list:
    size = tuple(preprocessing["input_size"])
    interpolation = INTERPOLATIONS[preprocessing["interpolation"]]
    if preprocessing["crop"] == "center":
        resize = v2.Resize(preprocessing["resize"], interpolation=interpolation, antialias=True)
        return [resize, v2.CenterCrop(size)]
    return [v2.Resize(size, interpolation=interpolation, antialias=True)]


class ToNormalizedTensor:
    """PIL image or uint8 tensor (..., C, H, W) -> float32 (x / 255 - mean) / std, plain tensor.

    One fused step (~20 us per 32 px image) where ToImage + ToDtype + Normalize + ToPureTensor
    take ~80 us, which matters at tens of thousands of samples per epoch.
    """

    def __init__(self, mean: list[float], std: list[float]) -> None:
        mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std_t), mean_t / std_t

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            array = np.asarray(image, dtype=np.float32)  # (H, W) or (H, W, C), 0..255
            array = array.reshape(array.shape[0], array.shape[1], -1).transpose(2, 0, 1)
            pixels = torch.from_numpy(np.ascontiguousarray(array))  # (C, H, W)
        else:
            pixels = image.as_subclass(torch.Tensor).contiguous().to(torch.float32)
        return pixels.mul_(self.scale).sub_(self.shift)

    def __repr__(self) -> str:
        mean = (self.shift / self.scale / 255.0).flatten().tolist()
        std = (1.0 / (255.0 * self.scale)).flatten().tolist()
        return f"{type(self).__name__}(mean={mean}, std={std})"


def _tensor_ops(preprocessing: dict) -> list:
    return [ToNormalizedTensor(preprocessing["mean"], preprocessing["std"])]


def _is_random(aug: dict) -> bool:
    geometry = aug["random_resized_crop"] or aug["pad_crop"] > 0 or bool(aug["hflip"])
    erase = aug["random_erasing"] > 0 or aug["cutout"] > 0
    return geometry or aug["auto_augment"] != "none" or erase


def _pick(value, preset_value, default):
    if value is not None:
        return value
    return default if preset_value is None else preset_value


def _check_augment(aug: dict) -> None:
    if aug["auto_augment"] not in AUTO_AUGMENTS:
        raise CnnkitError(
            f"data.auto_augment '{aug['auto_augment']}' is unknown; "
            f"use one of {', '.join(AUTO_AUGMENTS)}"
        )
    if isinstance(aug["hflip"], str) and aug["hflip"] != "alternate":
        raise CnnkitError(f"data.hflip is a probability or 'alternate', got '{aug['hflip']}'")
    for key in ("hflip", "random_erasing"):
        if not isinstance(aug[key], str) and not 0.0 <= aug[key] <= 1.0:
            raise CnnkitError(f"data.{key} is a probability in [0, 1], got {aug[key]}")
    for key in ("pad_crop", "cutout"):
        if aug[key] < 0:
            raise CnnkitError(f"data.{key} is a number of pixels >= 0, got {aug[key]}")
    if aug["pad_mode"] not in ("zero", "reflect"):
        raise CnnkitError(f"data.pad_mode must be zero or reflect, got '{aug['pad_mode']}'")
