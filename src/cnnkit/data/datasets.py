"""Datasets of a source: images in memory or image files, with integer labels.

``read_local`` reads a built-in, image folder or CSV source (see ``cnnkit.data.builtins`` and
``cnnkit.data.readers``) into a ``Source``: its splits as datasets without transforms, before a
validation split is carved. ``cnnkit.data.build`` adds tar shards, transforms and the rest.

Datasets yield ``(transform(image), target)``. A ``SampleAugment`` transform also gets the
sample's index and epoch (``sample(index, epoch)``, which the loaders call when it matters).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnkit.data import builtins
from cnnkit.data.images import file_stat, load_image
from cnnkit.data.loader import EpochDataset
from cnnkit.data.readers import Listing, eval_folder, read_labelled, read_layout, short
from cnnkit.data.transforms import SampleAugment
from cnnkit.errors import CnnkitError


@dataclass(frozen=True)
class Decoded:
    """A file split decoded once (``cnnkit.data.cache``): uint8 (N, C, H, W), row i being file i,
    at the stored ``geometry``."""

    images: torch.Tensor
    geometry: dict

    def subset(self, rows: torch.Tensor) -> Decoded:
        return Decoded(self.images[rows], self.geometry)


class TensorImageDataset(EpochDataset):
    """Images held in memory as uint8 (N, C, H, W) with integer labels; transform per sample."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], transform=None) -> None:
        self.images, self.targets, self.transform = images, list(targets), transform

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def subset(self, indices: Sequence[int]) -> TensorImageDataset:
        targets = [self.targets[i] for i in indices]
        return TensorImageDataset(self.images[_rows(indices)], targets, self.transform)

    def with_transform(self, transform, mode: str | None = None) -> TensorImageDataset:
        """Same images (shared memory) with another transform; ``mode`` is for file datasets."""
        return TensorImageDataset(self.images, self.targets, transform)

    @property
    def epoch_dependent(self) -> bool:
        return _epoch_dependent(self.transform)

    @property
    def deterministic(self) -> bool:
        """True when the transform has no randomness (then batches are transformed at once)."""
        return self.transform is None or getattr(self.transform, "deterministic", False)

    def __len__(self) -> int:
        return len(self.targets)

    def sample(self, index: int, epoch: int):
        image = self.images[index]  # uint8 (C, H, W)
        return _transformed(self.transform, image, index, epoch), self.targets[index]

    def __getitems__(self, indices: list[int]) -> list:
        """Samples for a batch of indices: one transform call for the whole batch when
        deterministic (~100x faster than per sample on 8x8 digits)."""
        if not self.deterministic:
            return [self[i] for i in indices]
        batch = self.images[torch.as_tensor(indices)]  # uint8 (B, C, H, W)
        if self.transform:
            batch = self.transform(batch)
        return list(zip(batch.unbind(0), [self.targets[i] for i in indices], strict=True))


class FileImageDataset(EpochDataset):
    """Image files with integer labels, decoded by ``load_image`` in ``mode`` ("RGB" or "L").

    ``stats``: (size, mtime_ns) per file as listed (taken with ``os.stat`` when not given), for
    fingerprints and cache keys. ``decoded``: the files decoded once in ``mode`` (given by
    ``cnnkit.data.build``, whose pre-flight made it); the in-memory loaders then read it instead
    of the files.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: Sequence[int],
        mode: str = "RGB",
        transform=None,
        stats: Sequence[tuple[int, int]] | None = None,
        decoded: Decoded | None = None,
    ) -> None:
        self.paths, self.targets = list(paths), list(targets)
        self.mode, self.transform = mode, transform
        self._stats = list(stats) if stats is not None else None
        self.decoded = decoded

    @classmethod
    def listed(cls, listing: Listing) -> FileImageDataset:
        """The files of a ``readers`` listing (RGB until ``with_transform`` gives the mode)."""
        return cls(listing.paths, listing.targets, stats=listing.stats)

    @property
    def stats(self) -> list[tuple[int, int]]:
        """(size, mtime_ns) per file; -1, -1 for a file that cannot be stat-ed."""
        if self._stats is None:
            self._stats = [file_stat(path) for path in self.paths]
        return self._stats

    def subset(self, indices: Sequence[int]) -> FileImageDataset:
        stats = [self._stats[i] for i in indices] if self._stats is not None else None
        paths, targets = [self.paths[i] for i in indices], [self.targets[i] for i in indices]
        decoded = self.decoded.subset(_rows(indices)) if self.decoded is not None else None
        return FileImageDataset(paths, targets, self.mode, self.transform, stats, decoded)

    def with_transform(self, transform, mode: str | None = None) -> FileImageDataset:
        """Same files with another transform (and mode; decoded images are kept when it is the
        mode they were decoded in)."""
        mode = mode or self.mode
        decoded = self.decoded if mode == self.mode else None
        return FileImageDataset(self.paths, self.targets, mode, transform, self._stats, decoded)

    def with_decoded(self, decoded: Decoded) -> FileImageDataset:
        """Same files, decoded once into ``decoded`` (in this dataset's mode)."""
        return FileImageDataset(
            self.paths, self.targets, self.mode, self.transform, self._stats, decoded
        )

    @property
    def epoch_dependent(self) -> bool:
        return _epoch_dependent(self.transform)

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, index: int, epoch: int):
        image = load_image(self.paths[index], self.mode)
        return _transformed(self.transform, image, index, epoch), self.targets[index]


def _transformed(transform, image, index: int, epoch: int):
    """``transform(image)``; a ``SampleAugment`` also gets the sample's index and epoch."""
    if transform is None:
        return image
    if isinstance(transform, SampleAugment):
        return transform(image, index, epoch)
    return transform(image)


def _epoch_dependent(transform) -> bool:
    return isinstance(transform, SampleAugment) and transform.epoch_dependent


def _rows(indices: Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(np.asarray(indices, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Sources read into datasets


@dataclass
class Source:
    """A source read from disk: datasets without transforms, before val carving."""

    name: str
    classes: list[str]
    train: TensorImageDataset | FileImageDataset
    val: TensorImageDataset | FileImageDataset | None
    test: TensorImageDataset | FileImageDataset | None
    fingerprint: str
    mean: tuple[float, ...] | None = None  # None: measured on the training images
    std: tuple[float, ...] | None = None
    preset: dict = field(default_factory=dict)  # train augmentation defaults (``Augment`` fields)


def read_local(source: str, cache_dir: Path) -> Source:
    """A built-in (stored in ``cache_dir``), an image folder or a CSV file, read into datasets."""
    key = builtins.builtin_key(source)
    if key is not None:
        return _builtin_source(key, cache_dir)
    layout = read_layout(existing_path(source))
    train = FileImageDataset.listed(layout.train)
    val = FileImageDataset.listed(layout.val) if layout.val is not None else None
    test = FileImageDataset.listed(layout.test) if layout.test is not None else None
    return Source(layout.name, layout.classes, train, val, test, layout.fingerprint)


def _builtin_source(key: str, cache_dir: Path) -> Source:
    builtin = builtins.BUILTINS[key]
    train, test, classes = builtin.load(cache_dir)
    mean, std = builtins.stats(key, train)
    train_set, test_set = TensorImageDataset(*train), TensorImageDataset(*test)
    fingerprint = builtins.fingerprint(key)
    return Source(key, classes, train_set, None, test_set, fingerprint, mean, std, builtin.preset)


def read_eval(source: str, classes: list[str], cache_dir: Path) -> EpochDataset:
    """Labelled images to evaluate a model of ``classes`` on: a built-in's test split, a folder
    of class folders (with a train/ layout: its test/, else its val/), or a CSV; an unknown
    label raises."""
    key = builtins.builtin_key(source)
    if key is not None:
        _, test, builtin_classes = builtins.BUILTINS[key].load(cache_dir)
        if builtin_classes != list(classes):
            raise CnnkitError(
                f"the model's classes {short(classes)} are not those of the "
                f"built-in dataset '{key}' {short(builtin_classes)}"
            )
        return TensorImageDataset(*test)
    path = existing_path(source)
    return labelled(eval_folder(path) if path.is_dir() else path, classes)


def labelled(path: Path, classes: list[str]) -> FileImageDataset:
    """An explicit val/test/eval folder of class folders or CSV, labelled by ``classes``."""
    return FileImageDataset.listed(read_labelled(path, classes))


def existing_path(source: str) -> Path:
    """The file or folder ``source`` names; else an error that suggests the closest built-in."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    close = difflib.get_close_matches(source.lower(), list(builtins.BUILTINS), n=1)
    hint = f" Did you mean the built-in '{close[0]}'?" if close else ""
    raise CnnkitError(
        f"data source '{source}' not found: not a folder, CSV file or built-in "
        f"dataset ({', '.join(builtins.BUILTINS)}).{hint}"
    )
