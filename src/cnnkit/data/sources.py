"""Where images come from: built-in datasets, image folders and CSV files, turned into ``Splits``.

Sources (``DataConfig.source``):

- built-in names: ``digits`` (scikit-learn, offline, the default), ``mnist``, ``fashion-mnist``,
  ``cifar10``, ``cifar100`` (torchvision, downloaded once into ``cache_dir``). Held in memory as
  uint8 tensors (N, C, H, W): no file or PIL work per sample.
- an image folder: ``root/train/<class>/*`` with ``root/val`` (or ``valid``, ``validation``)
  and/or ``root/test`` holding the same class folders; or just ``root/<class>/*``.
- a CSV file of ``path,label`` lines (a header line is optional; paths are relative to the CSV's
  folder; extra columns are ignored).

``DataConfig.val`` / ``DataConfig.test`` name an explicit folder of class subfolders or CSV.
Without a validation split, one is carved from train: stratified, seeded by the run seed.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cnnkit.config import DataConfig
from cnnkit.data import augment, shards
from cnnkit.data.augment import Augment
from cnnkit.data.host import cache_root, cpu_count
from cnnkit.data.images import (
    GRAY_MODES,
    IMAGE_EXTENSIONS,
    ImageFileError,
    file_stat,
    image_info,
    list_images,
    load_image,
    scan_images,
)
from cnnkit.data.loader import EpochDataset
from cnnkit.data.transforms import (
    SampleAugment,
    eval_transform,
    image_mode,
    make_preprocessing,
    train_transform,
)
from cnnkit.errors import CnnkitError

DIGITS_SPLIT_SEED = 0  # the digits test split is fixed: it must not move with the run seed
DIGITS_TEST_FRACTION = 0.2
SIZE_SAMPLE = 200  # images whose headers decide a folder's input size and channels
STATS_SAMPLE = 500  # images decoded to compute a folder's mean/std
VAL_DIRS = ("val", "valid", "validation")
PATH_HEADERS = frozenset({"path", "file", "filename", "file_name", "image", "img", "filepath"})
LABEL_HEADERS = frozenset({"label", "class", "target", "category"})


@dataclass
class Splits:
    """Datasets yielding (x float32 (C, H, W) normalised, y int), plus what describes them."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    classes: list[str]
    in_chans: int  # 1 or 3
    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str  # short dataset name for the run folder
    preprocessing: dict  # JSON-able; see cnnkit.data.transforms
    fingerprint: str  # changes when the files (or the built-in's version) change
    augment: Augment = field(default_factory=Augment)  # the train augmentation, resolved once
    skipped: list = field(default_factory=list)  # Findings of bad files left out (--skip-bad)


class TensorImageDataset(EpochDataset):
    """Images held in memory as uint8 (N, C, H, W) with integer labels; transform per sample."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], transform=None) -> None:
        self.images, self.targets, self.transform = images, list(targets), transform

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def subset(self, indices: Sequence[int]) -> TensorImageDataset:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        targets = [self.targets[i] for i in indices]
        return TensorImageDataset(self.images[index], targets, self.transform)

    def with_transform(self, transform, mode: str | None = None) -> TensorImageDataset:
        """Same images (shared memory) with another transform; ``mode`` is for file datasets."""
        return TensorImageDataset(self.images, self.targets, transform)

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
    fingerprints and cache keys. ``decoded``: set by ``build`` when the split was decoded once -
    uint8 (N, C, H, W) in ``mode`` at ``decoded_geometry`` (see ``cnnkit.data.cache``), row i
    being file i; the loaders then read it instead of the files.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: Sequence[int],
        mode: str = "RGB",
        transform=None,
        stats: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.paths, self.targets = list(paths), list(targets)
        self.mode, self.transform = mode, transform
        self._stats = list(stats) if stats is not None else None
        self.decoded: torch.Tensor | None = None
        self.decoded_geometry: dict | None = None

    @property
    def stats(self) -> list[tuple[int, int]]:
        """(size, mtime_ns) per file; -1, -1 for a file that cannot be stat-ed."""
        if self._stats is None:
            self._stats = [file_stat(path) for path in self.paths]
        return self._stats

    def subset(self, indices: Sequence[int]) -> FileImageDataset:
        stats = [self._stats[i] for i in indices] if self._stats is not None else None
        paths, targets = [self.paths[i] for i in indices], [self.targets[i] for i in indices]
        out = FileImageDataset(paths, targets, self.mode, self.transform, stats)
        if self.decoded is not None:
            rows = torch.as_tensor(np.asarray(indices, dtype=np.int64))
            out.decoded, out.decoded_geometry = self.decoded[rows], self.decoded_geometry
        return out

    def with_transform(self, transform, mode: str | None = None) -> FileImageDataset:
        out = FileImageDataset(self.paths, self.targets, mode or self.mode, transform, self._stats)
        if out.mode == self.mode:  # decoded in this mode: still valid
            out.decoded, out.decoded_geometry = self.decoded, self.decoded_geometry
        return out

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


@dataclass
class _Source:
    """A source read from disk: datasets without transforms, before val carving."""

    name: str
    classes: list[str]
    train: TensorImageDataset | FileImageDataset
    val: TensorImageDataset | FileImageDataset | None
    test: TensorImageDataset | FileImageDataset | None
    fingerprint: str
    mean: tuple[float, ...] | None = None  # None: computed from the training images
    std: tuple[float, ...] | None = None
    preset: dict = field(default_factory=dict)  # train augmentation defaults (``Augment`` fields)


@dataclass(frozen=True)
class _Builtin:
    load: Callable[[Path], tuple[TensorImageDataset, TensorImageDataset, list[str]]]
    mean: tuple[float, ...] | None  # None: computed from the train split
    std: tuple[float, ...] | None
    preset: dict
    files: str = ""  # what to put into cache_dir when offline


# ---------------------------------------------------------------------------------------------
# Public entry points


def build(cfg: DataConfig, seed: int, note: Callable[[str], None] | None = None) -> Splits:
    """Read ``cfg.source`` into train/val/test datasets with their transforms and description.

    Input size: ``cfg.input_size`` when set (square); else built-ins keep their native size and
    folders/CSV take it from the median shorter side s of up to 200 training images:
    s <= 40 px -> 32, s <= 80 px -> 64, else 224 (resize the shorter side, then center-crop).
    Channels: 1 when every sampled image is grayscale, else 3. Mean/std: published values for
    built-ins (digits: its fixed train split); folders/CSV: up to 500 training images at the
    input size. Val: ``cfg.val``, a val/ folder, else carved from train (``cfg.val_fraction``,
    stratified, seeded by ``seed``).
    """
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise CnnkitError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.input_size is not None and cfg.input_size < 1:
        raise CnnkitError(
            f"data.input_size must be a positive number of pixels or null, got {cfg.input_size}"
        )
    src = _read_source(cfg)
    in_chans, input_size, crop = _geometry(src.train, cfg.input_size)
    aug = augment.resolve(cfg, input_size, src.preset)
    streamed = isinstance(src.train, shards.ShardDataset)
    if streamed and aug.hflip == "alternate":
        raise CnnkitError(
            "data.hflip=alternate flips each image by its index, which streamed tar shards do "
            "not have; use a probability, e.g. data.hflip=0.5"
        )
    plain = make_preprocessing(in_chans, input_size, [0.0] * in_chans, [1.0] * in_chans, crop)
    skipped = preflight(src, cfg, plain, aug, note)
    train, val = src.train, src.val
    if streamed:
        train.seed = seed  # shard order and shuffle buffers follow the run's seed
    if val is None and cfg.val_fraction > 0 and not streamed:  # shards: give data.val
        keep, held = stratified_split(train.targets, cfg.val_fraction, seed)
        train, val = train.subset(keep), (train.subset(held) if len(held) else None)
    if cfg.mean is not None or cfg.std is not None:
        mean, std = _given_stats(cfg, in_chans)
    elif src.mean is None:
        mean, std = _image_stats(train, plain)
    else:
        mean, std = src.mean, src.std
    pre = make_preprocessing(in_chans, input_size, mean, std, crop)
    mode, evaluate = image_mode(pre), eval_transform(pre)
    return Splits(
        train=train.with_transform(train_transform(pre, aug, seed), mode),
        val=val.with_transform(evaluate, mode) if val is not None else None,
        test=src.test.with_transform(evaluate, mode) if src.test is not None else None,
        classes=src.classes,
        in_chans=in_chans,
        input_size=input_size,
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        name=src.name,
        preprocessing=pre,
        fingerprint=src.fingerprint,
        augment=aug,
        skipped=skipped,
    )


def preflight(
    src: _Source,
    cfg: DataConfig,
    plain: dict,
    aug: Augment,
    note: Callable[[str], None] | None = None,
) -> list:
    """Make sure training never meets a bad file by surprise, decoding each file once.

    File splits that fit the decode budget (``data.decode_cache``, ``data.cache_memory``) are
    decoded here into the decode-once cache (see ``cnnkit.data.cache``): that full decode is their
    check, and the loaders then read the decoded tensor. Other file splits are checked with the
    doctor's cached scan when ``data.check_files``. Bad files stop the run, naming them, unless
    ``cfg.skip_bad``: then they are left out of their split and returned (as ``doctor.Finding``)
    for the run folder's list. ``plain``: the preprocessing without mean/std; ``aug``: the
    train augmentation (random resized crops store larger images).
    """
    from cnnkit.data import cache
    from cnnkit.data.doctor import Finding, check_files, error_kind
    from cnnkit.data.loader import auto_workers

    budget = cache.DecodeBudget(cfg.decode_cache, cfg.cache_memory)
    names = ("train", "val", "test")
    files = {n: getattr(src, n) for n in names if isinstance(getattr(src, n), FileImageDataset)}
    if not files:
        return []
    note = note or cache.stderr_note
    mode, root = image_mode(plain), cache_root(cfg.cache_dir)
    bad, unchecked = [], []
    for name, dataset in files.items():
        geometry = cache.stored_geometry(plain, name == "train" and aug.random_resized_crop)
        if not budget.take(cache.decoded_bytes(len(dataset), mode, geometry)):
            unchecked.append(dataset)  # streams; run_loader says so when it makes the loader
            continue
        images, failures = cache.decode_checked(
            dataset.paths,
            dataset.stats,
            mode,
            geometry,
            root,
            workers=auto_workers(dataset),
            note=note,
        )
        dataset.decoded, dataset.decoded_geometry = images, geometry
        for i, message in failures:
            path = os.fspath(dataset.paths[i])
            if dataset.stats[i][0] == 0:  # as the doctor says it
                bad.append(Finding(path, "empty", f"{path} is empty (0 bytes)"))
            else:
                bad.append(Finding(path, error_kind(message), message))
    if cfg.check_files and unchecked:
        bad += check_files([p for dataset in unchecked for p in dataset.paths], cache_dir=root)
    if bad and not cfg.skip_bad:
        shown = "; ".join(f"{f.path} ({f.kind})" for f in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ImageFileError(
            f"{len(bad)} image file(s) cannot be used: {shown}{more}. Fix or remove them, or "
            "train with --skip-bad to leave them out (cnnkit doctor DATA gives the full report)"
        )
    dropped = {f.path for f in bad}
    for name, dataset in files.items():
        if dropped:
            keep = [i for i, p in enumerate(dataset.paths) if os.fspath(p) not in dropped]
            setattr(src, name, dataset.subset(keep))
    return bad


def _given_stats(cfg: DataConfig, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``data.mean``/``data.std`` from the config: both set, one value per channel, std > 0."""
    mean, std = cfg.mean, cfg.std
    if mean is None or std is None or len(mean) != in_chans or len(std) != in_chans:
        raise CnnkitError(
            f"data.mean and data.std need {in_chans} value(s) each for this {in_chans}-channel "
            f"data, got mean={mean} std={std}"
        )
    if not all(isinstance(v, int | float) for v in [*mean, *std]) or min(std) <= 0:
        raise CnnkitError(f"data.mean/std must be numbers with std > 0, got {mean} / {std}")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def build_eval(
    source: str, classes: list[str], preprocessing: dict, cache_dir: str | None = None
) -> Dataset:
    """Labelled eval dataset for a trained model: a built-in's test split, a folder of class
    subfolders (with a train/ layout: its test/, else its val/), or a CSV; labels are mapped to
    ``classes`` (an unknown label raises) and images get ``eval_transform(preprocessing)``.
    ``cache_dir``: where built-ins are stored (as ``data.cache_dir``; default: the cache folder)."""
    mode, transform = image_mode(preprocessing), eval_transform(preprocessing)
    key = _builtin_key(source)
    if key is not None and not Path(source).expanduser().exists():
        builtin = BUILTINS[key]
        folder = cache_root(cache_dir)
        _, test, builtin_classes = builtin.load(folder)
        if builtin_classes != list(classes):
            raise CnnkitError(
                f"the model's classes {_short(classes)} are not those of the "
                f"built-in dataset '{key}' {_short(builtin_classes)}"
            )
        return test.with_transform(transform)
    path = _existing_path(source)
    if path.is_dir():
        path = _eval_folder(path)
    return _labelled(path, classes).with_transform(transform, mode)


def stratified_split(
    targets: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(kept, held-out) sorted indices; each class holds out round(n * fraction) of its n samples,
    at least 1 (if fraction > 0) and at most n - 1, chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(targets)
    held: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(np.floor(len(members) * fraction + 0.5))
        if fraction > 0:
            count = min(max(count, 1), len(members) - 1)
        held.extend(rng.permutation(members)[:count].tolist())
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


# ---------------------------------------------------------------------------------------------
# Reading sources


def _read_source(cfg: DataConfig) -> _Source:
    path = Path(cfg.source).expanduser()
    key = _builtin_key(cfg.source)
    if shards.is_shard_source(cfg.source):
        train = shards.shard_dataset(cfg.source, shuffle=True)
        name = Path(train.urls[0]).parent.name or "shards"
        src = _Source(name, train.classes, train, None, None, shards.fingerprint(train))
    elif key is not None and not path.exists():
        src = _read_builtin(key, cache_root(cfg.cache_dir))
    else:
        path = _existing_path(cfg.source)
        src = _read_csv_source(path) if path.is_file() else _read_folder_source(path)
    if cfg.val is not None:
        src.val = _eval_split(cfg.val, src.classes)
    if cfg.test is not None:
        src.test = _eval_split(cfg.test, src.classes)
    return src


def _eval_split(source: str, classes: list[str]):
    """An explicit val/test source: tar shards, a folder of class subfolders or a CSV."""
    if not shards.is_shard_source(source):
        return _labelled(_existing_path(source), classes)
    dataset = shards.shard_dataset(source, shuffle=False)
    if dataset.classes != list(classes):
        raise CnnkitError(
            f"the shards {source} have classes {_short(dataset.classes)}, the training data "
            f"{_short(classes)}"
        )
    return dataset


def _read_builtin(key: str, cache_dir: Path) -> _Source:
    builtin = BUILTINS[key]
    train, test, classes = builtin.load(cache_dir)
    mean, std = builtin.mean, builtin.std
    if mean is None:  # digits: statistics of its fixed train split, in 0..1 units
        pixels = train.images.double() / 255
        mean, std = (pixels.mean().item(),), (pixels.std().item(),)
    fingerprint = hashlib.sha256(f"builtin:{key}:v1".encode()).hexdigest()[:16]
    return _Source(key, classes, train, None, test, fingerprint, mean, std, builtin.preset)


def _read_folder_source(root: Path) -> _Source:
    if (root / "train").is_dir():
        classes, train = _class_folders(root / "train")
        val_dir = next((root / d for d in VAL_DIRS if (root / d).is_dir()), None)
        val = _labelled_folder(val_dir, classes) if val_dir else None
        test = _labelled_folder(root / "test", classes) if (root / "test").is_dir() else None
    else:
        classes, train = _class_folders(root)
        val = test = None
    fingerprint = _files_fingerprint(root, classes, train, val, test)
    return _Source(root.resolve().name, classes, train, val, test, fingerprint)


def _read_csv_source(path: Path) -> _Source:
    if path.suffix.lower() != ".csv":
        raise CnnkitError(
            f"data source {path} is a file but not a .csv; give a folder of class "
            "subfolders, a CSV of path,label lines or a built-in dataset name"
        )
    rows = _read_csv(path)
    classes = _sort_labels({label for _, label in rows})
    train = _csv_dataset(path, rows, classes)
    fingerprint = _files_fingerprint(path.parent, classes, train, None, None)
    return _Source(path.stem, classes, train, None, None, fingerprint)


def _labelled(path: Path, classes: list[str]) -> FileImageDataset:
    """An explicit val/test/eval source (folder of class subfolders or CSV) against ``classes``."""
    if path.is_dir():
        return _labelled_folder(path, classes)
    if path.suffix.lower() != ".csv":
        raise CnnkitError(
            f"{path} is a file but not a .csv; give a folder of class subfolders "
            "or a CSV of path,label lines"
        )
    return _csv_dataset(path, _read_csv(path), classes)


def _eval_folder(root: Path) -> Path:
    """The folder to evaluate in a source: test/, else val/ for a train/ layout, else root."""
    if not (root / "train").is_dir():
        return root
    for name in ("test", *VAL_DIRS):
        if (root / name).is_dir():
            return root / name
    raise CnnkitError(
        f"{root} has a train/ folder but no test/ or val/ folder to evaluate on; "
        "give the folder of the images to evaluate"
    )


def _existing_path(source: str) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path
    close = difflib.get_close_matches(source.lower(), list(BUILTINS), n=1)
    hint = f" Did you mean the built-in '{close[0]}'?" if close else ""
    raise CnnkitError(
        f"data source '{source}' not found: not a folder, CSV file or built-in "
        f"dataset ({', '.join(BUILTINS)}).{hint}"
    )


# ---------------------------------------------------------------------------------------------
# Folders and CSV files


def _class_folders(folder: Path) -> tuple[list[str], FileImageDataset]:
    """Classes (sorted subfolder names) and the dataset of their images."""
    subdirs = _subdirs(folder)
    if not subdirs:
        if list_images(folder):
            raise CnnkitError(
                f"images in {folder} must be sorted into one subfolder per class "
                f"({folder}/<class>/<image>)"
            )
        raise CnnkitError(
            f"no images in {folder}: expected {folder}/<class>/<image> files "
            f"({' '.join(IMAGE_EXTENSIONS)})"
        )
    classes = _sort_labels({d.name for d in subdirs})
    return classes, _labelled_folder(folder, classes)


def _labelled_folder(folder: Path, classes: list[str]) -> FileImageDataset:
    """Images of ``folder``/<class>/, labelled by the index of <class> in ``classes``."""
    index = {name: i for i, name in enumerate(classes)}
    subdirs = _subdirs(folder)
    if not subdirs:
        raise CnnkitError(f"no class subfolders in {folder}: expected {folder}/<class>/<image>")
    paths, targets, stats = [], [], []
    for sub in sorted(subdirs, key=lambda d: index.get(d.name, -1)):
        if sub.name not in index:
            raise CnnkitError(
                f"class folder {sub} is not a training class {_short(classes)}; rename or remove it"
            )
        files = scan_images(sub)
        if not files:
            raise CnnkitError(
                f"class folder {sub} has no images ({' '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        paths += [path for path, _, _ in files]
        stats += [(size, mtime) for _, size, mtime in files]
        targets += [index[sub.name]] * len(files)
    return FileImageDataset(paths, targets, stats=stats)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_csv(path: Path) -> list[tuple[Path, str]]:
    """(image path, label) rows of a CSV; paths relative to the CSV's folder; files must exist."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        lines = [(n, row) for n, row in enumerate(csv.reader(f), 1) if any(c.strip() for c in row)]
    if lines and _is_header(lines[0][1], path.parent):
        lines = lines[1:]
    if not lines:
        raise CnnkitError(f"CSV {path} lists no images; expected lines of path,label")
    rows = []
    for n, row in lines:
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise CnnkitError(f"CSV {path} line {n}: expected path,label, got {','.join(row)!r}")
        rows.append((path.parent / row[0].strip(), row[1].strip()))
    missing = [str(p) for p, _ in rows if not p.is_file()]
    if missing:
        raise CnnkitError(
            f"CSV {path}: {len(missing)} listed file(s) do not exist, e.g. "
            f"{missing[0]} (paths are relative to {path.parent})"
        )
    return rows


def _is_header(row: list[str], folder: Path) -> bool:
    if len(row) < 2 or (folder / row[0].strip()).is_file():
        return False
    return row[0].strip().lower() in PATH_HEADERS or row[1].strip().lower() in LABEL_HEADERS


def _csv_dataset(path: Path, rows: list[tuple[Path, str]], classes: list[str]) -> FileImageDataset:
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({label for _, label in rows if label not in index})
    if unknown:
        raise CnnkitError(
            f"CSV {path} has labels that are not training classes: "
            f"{_short(unknown)}; known classes: {_short(classes)}"
        )
    return FileImageDataset([p for p, _ in rows], [index[label] for _, label in rows])


def _sort_labels(labels: set[str]) -> list[str]:
    """Class names in order: numerically when all are integers ("2" before "10"), else by text."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _files_fingerprint(root: Path, classes: list[str], *splits) -> str:
    """Hash of every split's (relative path, size, mtime, label) and the class names."""
    digest = hashlib.sha256("\n".join(classes).encode())
    for name, dataset in zip(("train", "val", "test"), splits, strict=True):
        if dataset is None:
            continue
        prefix = os.path.join(os.fspath(root), "")
        rows = zip(dataset.paths, dataset.stats, dataset.targets, strict=True)
        for path, (size, mtime), label in rows:
            text = os.fspath(path)
            # a plain prefix cut: os.path.relpath costs ~20 us a file (1 s for CIFAR-10)
            rel = text[len(prefix) :] if text.startswith(prefix) else os.path.relpath(text, root)
            digest.update(f"{name}\t{rel}\t{size}\t{mtime}\t{label}\n".encode())
    return digest.hexdigest()[:16]


def _short(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(map(str, names[:limit]))
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


# ---------------------------------------------------------------------------------------------
# Input size, channels and statistics


def _geometry(
    train: TensorImageDataset | FileImageDataset, input_size: int | None
) -> tuple[int, tuple[int, int], str]:
    """(in_chans, (H, W), crop). In-memory datasets: native size, resized to ``input_size`` if set.

    Files: ``input_size`` if set, else from the median shorter side s of up to SIZE_SAMPLE images:
    s <= 40 px -> 32, s <= 80 px -> 64, else 224. One channel when every sampled image is
    grayscale (modes 1, L, LA, I, I;16, F), else three. Files are resized and center-cropped.
    """
    if isinstance(train, TensorImageDataset):
        _, chans, height, width = train.images.shape
        size = (input_size, input_size) if input_size else (height, width)
        return chans, size, "none"
    if isinstance(train, shards.ShardDataset):
        infos = train.headers(SIZE_SAMPLE)  # the first images of the first shards
    else:
        infos = _headers(_even_sample(train.paths, SIZE_SAMPLE))
    chans = 1 if all(mode in GRAY_MODES for _, _, mode in infos) else 3
    if input_size is None:
        side = float(np.median([min(w, h) for w, h, _ in infos]))
        input_size = 32 if side <= 40 else 64 if side <= 80 else 224
    return chans, (input_size, input_size), "center"


def _headers(paths: Sequence) -> list[tuple[int, int, str]]:
    """(width, height, mode) of the files whose header can be read; bad files are left to the
    pre-flight check, which names every one (raises only when none is readable)."""
    infos, first_error = [], None
    for path in paths:
        try:
            infos.append(image_info(path))
        except ImageFileError as e:
            first_error = first_error or e
    if not infos and first_error is not None:
        raise first_error
    return infos


def _image_stats(
    train: TensorImageDataset | FileImageDataset, plain: dict
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std (0..1 units) of up to STATS_SAMPLE training images at the input size
    (resized and cropped as for evaluation; ``plain``: the preprocessing without mean/std)."""
    in_chans = plain["in_chans"]
    if isinstance(train, shards.ShardDataset):
        dataset = train.with_transform(eval_transform(plain), image_mode(plain))
        samples = [image for image, _ in shards.first_samples(dataset, STATS_SAMPLE)]
    else:
        samples = _uint8_samples(train, plain, _even_sample(range(len(train)), STATS_SAMPLE))
    total = torch.zeros(3, in_chans, dtype=torch.float64)  # pixel count, sum, sum of squares
    for image in samples:
        pixels = image.double().flatten(1)  # (C, H * W)
        if image.dtype == torch.uint8:
            pixels = pixels / 255.0
        total[0] += pixels.shape[1]
        total[1] += pixels.sum(1)
        total[2] += (pixels**2).sum(1)
    mean = total[1] / total[0]
    std = (total[2] / total[0] - mean**2).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.clamp_min(1e-3).tolist())


def _uint8_samples(train, plain: dict, indices: list[int]) -> list[torch.Tensor]:
    """uint8 (C, H, W) images of ``train`` at the eval geometry: from the decoded tensor when it
    holds that geometry, else decoded from the files the same way (so both agree bit for bit)."""
    from cnnkit.data import cache

    geometry = cache.stored_geometry(plain, False)
    if isinstance(train, TensorImageDataset):
        images = train.images[torch.as_tensor(indices, dtype=torch.long)]
        if list(images.shape[-2:]) != list(geometry["size"]):
            images = cache.geometry_ops(geometry)(images)
        return list(images)
    if train.decoded is not None and train.decoded_geometry == geometry:
        return list(train.decoded[torch.as_tensor(indices, dtype=torch.long)])
    ops, mode = cache.geometry_ops(geometry), image_mode(plain)

    def one(index: int) -> torch.Tensor:
        image = load_image(train.paths[index], mode)
        return torch.from_numpy(cache.to_geometry(image, geometry, ops).copy())

    with ThreadPoolExecutor(max_workers=min(8, cpu_count())) as pool:
        return list(pool.map(one, indices))


def _even_sample(items: Sequence, count: int) -> list:
    """Up to ``count`` items spread evenly over ``items`` (deterministic)."""
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


# ---------------------------------------------------------------------------------------------
# Built-in datasets


def _load_digits(cache_dir: Path) -> tuple[TensorImageDataset, TensorImageDataset, list[str]]:
    """scikit-learn's 1797 8x8 digits, 0..16 scaled to 0..255; fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits  # deferred: importing sklearn takes ~1 s

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    images = torch.from_numpy(pixels).unsqueeze(1)  # (N, 1, 8, 8)
    full = TensorImageDataset(images, digits.target.tolist())
    train_idx, test_idx = stratified_split(full.targets, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    return full.subset(train_idx), full.subset(test_idx), [str(d) for d in range(10)]


def _load_torchvision(
    class_name: str, key: str, cache_dir: Path, classes: list[str] | None = None
) -> tuple[TensorImageDataset, TensorImageDataset, list[str]]:
    """A torchvision dataset's train and test splits as uint8 tensors, downloaded if needed."""
    train, names = _torchvision_split(class_name, key, cache_dir, train=True)
    test, _ = _torchvision_split(class_name, key, cache_dir, train=False)
    return train, test, classes or names


def _torchvision_split(
    class_name: str, key: str, cache_dir: Path, train: bool
) -> tuple[TensorImageDataset, list[str]]:
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
    targets = torch.as_tensor(dataset.targets).tolist()
    return TensorImageDataset(images, targets), list(dataset.classes)


def _builtin_key(source: str) -> str | None:
    """Canonical built-in name for ``source`` ("CIFAR-10" -> "cifar10"), or None."""
    squashed = source.strip().lower().replace("-", "").replace("_", "")
    return next((k for k in BUILTINS if k.replace("-", "") == squashed), None)


_DIGIT_NAMES = [str(d) for d in range(10)]
BUILTINS: dict[str, _Builtin] = {
    "digits": _Builtin(_load_digits, None, None, {"hflip": 0.0, "pad_crop": 0}),
    "mnist": _Builtin(
        partial(_load_torchvision, "MNIST", "mnist", classes=_DIGIT_NAMES),
        (0.1307,),
        (0.3081,),
        {"hflip": 0.0, "pad_crop": 2},
        "the four MNIST/raw/*-ubyte(.gz) files",
    ),
    "fashion-mnist": _Builtin(
        partial(_load_torchvision, "FashionMNIST", "fashion-mnist"),
        (0.2860,),
        (0.3530,),
        {"hflip": 0.5, "pad_crop": 2},
        "the four FashionMNIST/raw/*-ubyte(.gz) files",
    ),
    "cifar10": _Builtin(
        partial(_load_torchvision, "CIFAR10", "cifar10"),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        {"hflip": 0.5, "pad_crop": 4},
        "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/ folder)",
    ),
    "cifar100": _Builtin(
        partial(_load_torchvision, "CIFAR100", "cifar100"),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        {"hflip": 0.5, "pad_crop": 4},
        "cifar-100-python.tar.gz (or its extracted cifar-100-python/ folder)",
    ),
}
