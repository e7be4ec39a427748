"""Built-in datasets: ``digits`` (scikit-learn, offline, the default), ``mnist``,
``fashion-mnist``, ``cifar10``, ``cifar100`` (torchvision, downloaded once into the cache folder;
offline, the error names the files to put there).

Each loads as uint8 images (N, C, H, W) with integer targets, held in memory: no file or PIL
work per sample. A source names a built-in when it is one's name, in any case, with or without
dashes and underscores ("CIFAR-10"), and no file or folder of that name exists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from cnnkit.data.readers import stratified_split
from cnnkit.errors import CnnkitError

DIGITS_SPLIT_SEED = 0  # the digits test split is fixed: it must not move with the run seed
DIGITS_TEST_FRACTION = 0.2

Images = tuple[torch.Tensor, list[int]]  # uint8 (N, C, H, W) and a class index per image


@dataclass(frozen=True)
class Builtin:
    load: Callable[[Path], tuple[Images, Images, list[str]]]  # cache folder -> train, test, classes
    mean: tuple[float, ...] | None  # None: measured on the train split (``stats``)
    std: tuple[float, ...] | None
    preset: dict  # train augmentation defaults (``Augment`` fields), replaced by the config
    files: str = ""  # what to put into the cache folder when offline


def builtin_key(source: str) -> str | None:
    """Canonical built-in name that ``source`` names ("CIFAR-10" -> "cifar10"), or None (also
    when a file or folder called ``source`` exists: then that is the source)."""
    if Path(source).expanduser().exists():
        return None
    squashed = source.strip().lower().replace("-", "").replace("_", "")
    return next((k for k in BUILTINS if k.replace("-", "") == squashed), None)


def fingerprint(key: str) -> str:
    """Changes when the built-in's contents change (its version here)."""
    return hashlib.sha256(f"builtin:{key}:v1".encode()).hexdigest()[:16]


def stats(key: str, train: Images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel in 0..1 units: the published values, or for digits those of all
    pixels of its fixed train split."""
    builtin = BUILTINS[key]
    if builtin.mean is not None:
        return builtin.mean, builtin.std
    pixels = train[0].double() / 255
    return (pixels.mean().item(),), (pixels.std().item(),)


def load_digits(cache_dir: Path | None = None) -> tuple[Images, Images, list[str]]:
    """scikit-learn's 1797 8x8 digits, 0..16 scaled to 0..255; fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits  # deferred: ~1 s to import

    digits = sklearn_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    images = torch.from_numpy(pixels).unsqueeze(1)  # (N, 1, 8, 8)
    targets = digits.target.tolist()
    train, test = stratified_split(targets, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    return _rows(images, targets, train), _rows(images, targets, test), _DIGIT_NAMES


def _rows(images: torch.Tensor, targets: list[int], rows: list[int]) -> Images:
    return images[torch.as_tensor(rows, dtype=torch.long)], [targets[i] for i in rows]


def _load_torchvision(
    class_name: str, key: str, cache_dir: Path, classes: list[str] | None = None
) -> tuple[Images, Images, list[str]]:
    """A torchvision dataset's train and test splits as uint8 tensors, downloaded if needed."""
    train, names = _torchvision_split(class_name, key, cache_dir, train=True)
    test, _ = _torchvision_split(class_name, key, cache_dir, train=False)
    return train, test, classes or names


def _torchvision_split(
    class_name: str, key: str, cache_dir: Path, train: bool
) -> tuple[Images, list[str]]:
    import torchvision.datasets

    try:
        dataset = getattr(torchvision.datasets, class_name)(
            str(cache_dir), train=train, download=True
        )
    except (OSError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CnnkitError(
            f"cannot load built-in dataset '{key}' into {cache_dir} ({reason}). Offline? Put "
            f"{BUILTINS[key].files} into {cache_dir}, or set data.cache_dir to the folder that "
            "holds them, or use a local image folder"
        ) from None
    data = torch.as_tensor(np.asarray(dataset.data))  # MNIST (N, H, W); CIFAR (N, H, W, C)
    images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2).contiguous()
    return (images, torch.as_tensor(dataset.targets).tolist()), list(dataset.classes)


_DIGIT_NAMES = [str(d) for d in range(10)]
BUILTINS: dict[str, Builtin] = {
    "digits": Builtin(load_digits, None, None, {"hflip": 0.0, "pad_crop": 0}),
    "mnist": Builtin(
        partial(_load_torchvision, "MNIST", "mnist", classes=_DIGIT_NAMES),
        (0.1307,),
        (0.3081,),
        {"hflip": 0.0, "pad_crop": 2},
        "the four MNIST/raw/*-ubyte(.gz) files",
    ),
    "fashion-mnist": Builtin(
        partial(_load_torchvision, "FashionMNIST", "fashion-mnist"),
        (0.2860,),
        (0.3530,),
        {"hflip": 0.5, "pad_crop": 2},
        "the four FashionMNIST/raw/*-ubyte(.gz) files",
    ),
    "cifar10": Builtin(
        partial(_load_torchvision, "CIFAR10", "cifar10"),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        {"hflip": 0.5, "pad_crop": 4},
        "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/ folder)",
    ),
    "cifar100": Builtin(
        partial(_load_torchvision, "CIFAR100", "cifar100"),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        {"hflip": 0.5, "pad_crop": 4},
        "cifar-100-python.tar.gz (or its extracted cifar-100-python/ folder)",
    ),
}
