"""The train augmentation of a run: one ``Augment`` spec, resolved once, run by two executors.

``resolve(cfg, input_size, preset)`` turns the data config, the dataset's preset and the input
size into a frozen ``Augment``; ``cnnkit.data.build`` does it once and the spec travels on
``Splits.augment``. Two executors run the image ops of ``OPS``, in that order:

- per sample (``cnnkit.data.transforms.SampleAugment``): torchvision v2 kernels on one PIL image
  or uint8 tensor (C, H, W); every op;
- batched (``cnnkit.data.batchaug.BatchAugment``): uint8 batches (B, C, H, W) on the training
  device; the ops in ``batchaug.BATCHED_OPS`` (a split whose spec has others takes the
  per-sample path).

Both draw their parameters from the same distributions and apply them the same way
(``tests/test_augment.py`` runs every op through both). MixUp/CutMix mix whole batches and their
labels after either executor (``transforms.batch_mix``). Adding an op: a field here (and the
``DataConfig`` key of the same name), its name in ``OPS``, its step in ``SampleAugment`` and,
when it can be batched, in ``BatchAugment``.

Defaults by input side, replaced by the dataset's preset, then by each config value not None:

    side      geometry                                                          hflip
    < 64 px   random crop after padding by side // 8 px (4 at 32, 1 at 8)        0.5
    >= 64 px  random resized crop of area scale (0.25, 1) under 128 px,          0.5
              (0.08, 1) from 128 px (more zoom is too much for small inputs)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from cnnkit.config import DataConfig
from cnnkit.data.loader import mix_seed

LARGE_INPUT = 64  # px: from this side up, train with random resized crops (eval: centre crop)
DEFAULT_HFLIP = 0.5
# image ops in the order both executors apply them (normalisation comes before random_erasing)
OPS = (
    "random_resized_crop", "pad_crop", "rotate", "hflip",
    "auto_augment", "random_erasing", "cutout",
)  # fmt: skip


@dataclass(frozen=True)
class Augment:
    """What the training images go through; the defaults do nothing (evaluation)."""

    random_resized_crop: bool = False
    rrc_scale: tuple[float, float] = (0.08, 1.0)  # crop area range, fraction of the image area
    pad_crop: int = 0  # px of padding before a random crop back to the input size
    pad_mode: str = "zero"  # zero | reflect: how the padding is filled
    rotate: float = 0.0  # degrees: an angle uniform in [-rotate, rotate] per image (0: off)
    hflip: float | str = 0.0  # flip probability, or "alternate" (see ``alternate_flips``)
    auto_augment: str = "none"  # none | trivial | rand
    random_erasing: float = 0.0  # probability of erasing a random rectangle
    cutout: int = 0  # side in px of a square set to the mean colour (0 once normalised)
    mixup: float = 0.0  # Beta(alpha, alpha) of MixUp; 0: off
    cutmix: float = 0.0  # Beta(alpha, alpha) of CutMix; 0: off

    def ops(self) -> tuple[str, ...]:
        """The image ops that do something, in the order they are applied."""
        return tuple(name for name in OPS if getattr(self, name) != getattr(_OFF, name))

    @property
    def random(self) -> bool:
        """True when some image op is random (else training images are transformed as eval's)."""
        return bool(self.ops())


_OFF = Augment()


def resolve(cfg: DataConfig, input_size: tuple[int, int], preset: dict | None = None) -> Augment:
    """The spec of a run: each ``cfg`` value that is not None, else the dataset's ``preset``
    (e.g. ``{"hflip": 0.0, "pad_crop": 2}``), else the default for the input side."""
    defaults = {**_size_defaults(min(input_size)), **(preset or {})}
    values = {}
    for spec_field in dataclasses.fields(Augment):
        given = getattr(cfg, spec_field.name, None)
        values[spec_field.name] = given if given is not None else defaults.get(spec_field.name)
    if values["rrc_scale"] is not None:
        values["rrc_scale"] = tuple(float(v) for v in values["rrc_scale"])
    return Augment(**{name: value for name, value in values.items() if value is not None})


def _size_defaults(side: int) -> dict:
    large = side >= LARGE_INPUT
    return {
        "random_resized_crop": large,
        "rrc_scale": (0.08, 1.0) if side >= 128 else (0.25, 1.0),
        "pad_crop": 0 if large else side // 8,
        "hflip": DEFAULT_HFLIP,
    }


def alternate_flips(indices: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """(B,) bool flips of dataset images ``indices`` (B,) for ``hflip="alternate"``: a fixed coin
    per (seed, index) on even epochs, its opposite on odd ones, so every image is seen both ways
    every two epochs (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds", 2024)."""
    return _index_coins(indices, seed) ^ bool(epoch % 2)


def _index_coins(indices: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed random bit per dataset index: a multiply-xorshift hash of (index, seed)."""
    salt = mix_seed(seed, 0xF11F) & 0x7FFFFFFF
    x = (indices.long() * 0x9E3779B1 + salt) & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    x = x ^ (x >> 12)
    return (x & 1).bool()
