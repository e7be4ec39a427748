"""Eval transforms, and the per-sample executor of the train ``Augment`` (torchvision v2).

The ``preprocessing`` dict saved in the model file is all that eval and predict need:

    {"in_chans": 1|3, "input_size": [H, W], "resize": int, "crop": "center"|"none",
     "interpolation": "bilinear", "mean": [...], "std": [...]}

``crop == "center"``: resize the shorter side to ``resize`` then center-crop ``input_size``;
``crop == "none"``: resize straight to ``input_size``. Transforms take a PIL image (mode from
``image_mode``) or a uint8 tensor (C, H, W) and return a float32 tensor (C, H, W), normalised.

Training: ``train_transform`` runs the run's ``Augment`` (``cnnkit.data.augment``) one image at
a time with ``SampleAugment``; ``cnnkit.data.batchaug.BatchAugment`` is its batched twin.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cnnkit.data.augment import LARGE_INPUT, Augment, alternate_flips
from cnnkit.data.batchaug import rotate
from cnnkit.data.images import mode_for
from cnnkit.errors import CnnkitError

CROP_RATIO = 0.875  # eval on large inputs: resize the shorter side to size / 0.875 (224 <- 256)

INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}
AUTO_AUGMENT_POLICIES = {"trivial": v2.TrivialAugmentWide, "rand": v2.RandAugment}


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


def at_side(preprocessing: dict, side: int) -> dict:
    """``preprocessing`` for a square ``side`` other than the trained one, with the same crop
    ratio (evaluating a little larger than the train side can score better: the FixRes effect)."""
    pre = preprocessing
    resized = make_preprocessing(
        pre["in_chans"], (side, side), pre["mean"], pre["std"], pre["crop"]
    )
    return {**resized, "interpolation": pre["interpolation"]}


def image_mode(preprocessing: dict) -> str:
    """PIL mode to load images in for this preprocessing: "L" for 1 channel, else "RGB"."""
    return mode_for(preprocessing["in_chans"])


def eval_transform(preprocessing: dict) -> v2.Compose:
    """Deterministic transform for val/test/predict: resize (+ center crop), scale, normalise.

    Its ``deterministic`` attribute is True: it may also be applied to a batch (B, C, H, W).
    """
    transform = v2.Compose(_resize_ops(preprocessing) + _tensor_ops(preprocessing))
    transform.deterministic = True
    return transform


def train_transform(preprocessing: dict, aug: Augment, seed: int = 0) -> Callable:
    """The per-sample train transform of ``aug`` (a ``SampleAugment``), or
    ``eval_transform(preprocessing)`` when no image op of ``aug`` is random. ``seed``: the run's
    seed (alternating flips depend on it)."""
    if not aug.random:
        return eval_transform(preprocessing)
    return SampleAugment(aug, preprocessing, seed)


class SampleAugment:
    """Per-sample executor of an ``Augment``: ``augment(image, index, epoch)`` -> (C, H, W) float.

    ``image``: PIL (mode from ``image_mode``) or uint8 (C, H, W), any size. Random parameters
    come from the global CPU RNG, which the loaders seed per (seed, epoch, index); alternating
    flips use ``index`` and ``epoch`` themselves. ``draw`` makes the parameters and ``apply`` uses
    them, with the keys of ``BatchAugment.draw`` (one image's values), so both executors can be
    run on the same parameters.
    """

    def __init__(self, aug: Augment, preprocessing: dict, seed: int = 0) -> None:
        self.aug, self.seed = aug, seed
        self.size = [int(side) for side in preprocessing["input_size"]]  # [H, W]
        self.interpolation = INTERPOLATIONS[preprocessing["interpolation"]]
        self.rrc = None  # kept for its draw: torchvision's algorithm
        if aug.random_resized_crop:
            self.rrc = v2.RandomResizedCrop(self.size, scale=aug.rrc_scale, antialias=True)
        self.resize = v2.Compose(_resize_ops(preprocessing))
        policy = AUTO_AUGMENT_POLICIES.get(aug.auto_augment)
        self.auto = policy() if policy is not None else None
        self.normalise = ToNormalizedTensor(preprocessing["mean"], preprocessing["std"])
        self.erase = v2.RandomErasing(aug.random_erasing) if aug.random_erasing > 0 else None

    @property
    def epoch_dependent(self) -> bool:
        """True when an image's augmentation depends on its index and the epoch, not only on
        the RNG (alternating flips)."""
        return self.aug.hflip == "alternate"

    def __call__(self, image, index: int | None = None, epoch: int = 0) -> torch.Tensor:
        return self.apply(image, self.draw(image, index, epoch))

    def draw(self, image, index: int | None, epoch: int) -> dict:
        """Parameters for one image: ``box`` (top, left, height, width) of the random resized
        crop, ``shift`` (dy, dx) in [0, 2 pad], ``angle`` (degrees), ``flip``, ``cutout`` centre
        (y, x). Auto-augment and random erasing draw their own when applied."""
        aug, params = self.aug, {}
        if self.rrc is not None:
            box = self.rrc.make_params([image])
            params["box"] = (box["top"], box["left"], box["height"], box["width"])
        if aug.pad_crop:
            span = 2 * aug.pad_crop + 1  # the two draws of v2.RandomCrop(padding=pad_crop)
            params["shift"] = tuple(int(torch.randint(0, span, size=())) for _ in range(2))
        if aug.rotate:
            params["angle"] = float(torch.rand(()) * 2 - 1) * aug.rotate
        if aug.hflip == "alternate":
            params["flip"] = self._alternate_flip(index, epoch)
        elif aug.hflip:
            params["flip"] = bool(torch.rand(1) < aug.hflip)  # the draw of v2.RandomHorizontalFlip
        if aug.cutout:
            params["cutout"] = tuple(int(torch.randint(side, ())) for side in self.size)
        return params

    def apply(self, image, params: dict) -> torch.Tensor:
        """``image`` augmented with ``params`` (from ``draw``), then normalised."""
        if "box" in params:
            x = TF.resized_crop(
                image, *params["box"], self.size, self.interpolation, antialias=True
            )
        else:
            x = self.resize(image)
        if "shift" in params:
            x = self._shift(x, params["shift"])
        if "angle" in params:  # the batched kernel on one image: float32 0..255 from here
            x = rotate(_as_tensor(x)[None], torch.tensor([params["angle"]]))[0]
        if params.get("flip"):
            x = TF.horizontal_flip(x)
        if self.auto is not None:
            x = self.auto(x.round().to(torch.uint8) if "angle" in params else x)
        x = self.normalise(x)
        if self.erase is not None:
            x = self.erase(x)
        if "cutout" in params:
            x = _cutout(x, params["cutout"], self.aug.cutout)
        return x

    def apply_mask(self, mask: torch.Tensor, params: dict, fill: int) -> torch.Tensor:
        """The geometry of ``apply`` with the same ``params`` on a mask uint8 (H, W) of the
        image's size: nearest resampling, ``fill`` (the ignore value) where a shift or a turn
        uncovers pixels, no cutout or colour ops. int64 (H, W) at the input size."""
        x = mask[None]  # (1, H, W)
        nearest = v2.InterpolationMode.NEAREST_EXACT  # half-pixel centres, as the image's
        if "box" in params:
            x = TF.resized_crop(x, *params["box"], self.size, nearest)
        else:
            x = TF.resize(x, self.size, nearest)
        if "shift" in params:
            x = self._shift(x, params["shift"], fill)
        if "angle" in params:
            x = rotate(x[None], torch.tensor([params["angle"]]), fill=float(fill))[0]
        if params.get("flip"):
            x = TF.horizontal_flip(x)
        return x[0].round().long()

    def _shift(self, x, shift: tuple[int, int], fill: int = 0):
        """Pad by ``pad_crop`` px (``fill`` or mirrored), then crop the input size at (dy, dx)."""
        pad = self.aug.pad_crop
        mode = "reflect" if self.aug.pad_mode == "reflect" else "constant"
        x = TF.pad(x, [pad, pad, pad, pad], fill=fill, padding_mode=mode)
        return TF.crop(x, shift[0], shift[1], *self.size)

    def _alternate_flip(self, index: int | None, epoch: int) -> bool:
        if index is None:
            raise CnnkitError(
                "data.hflip=alternate flips each image by its index and the epoch, which this "
                "dataset does not give (streamed shards); use a probability, e.g. data.hflip=0.5"
            )
        return bool(alternate_flips(torch.tensor([index]), epoch, self.seed)[0])


def _as_tensor(image) -> torch.Tensor:
    """A PIL image or a (uint8) tensor (C, H, W) as a plain tensor."""
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image)
    return image.as_subclass(torch.Tensor)


def _cutout(image: torch.Tensor, centre: tuple[int, int], size: int) -> torch.Tensor:
    """Set a ``size`` x ``size`` square of a normalised (C, H, W) image around ``centre`` (y, x),
    clipped at the borders, to 0, i.e. to the mean colour (DeVries & Taylor, 2017)."""
    top, left = centre[0] - size // 2, centre[1] - size // 2
    image = image.clone()
    image[..., max(top, 0) : top + size, max(left, 0) : left + size] = 0
    return image


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


def batch_mix(aug: Augment, num_classes: int) -> BatchMix | None:
    """MixUp (``aug.mixup`` alpha), CutMix (``aug.cutmix`` alpha), a random choice of the two per
    batch when both are set, or None when both are 0. Applied to the batches of either executor."""
    mixes = []
    if aug.mixup > 0:
        mixes.append(v2.MixUp(alpha=aug.mixup, num_classes=num_classes))
    if aug.cutmix > 0:
        mixes.append(v2.CutMix(alpha=aug.cutmix, num_classes=num_classes))
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
