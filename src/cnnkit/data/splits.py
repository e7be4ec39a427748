"""``build``: a data config -> ``Splits``, the datasets of a run and what describes them.

(Not ``build.py``: a submodule of that name would replace the function ``cnnkit.data.build`` as
the package's attribute as soon as something imported it.)

Sources (``DataConfig.source``):

- built-in names: ``digits`` (the default), ``mnist``, ``fashion-mnist``, ``cifar10``,
  ``cifar100`` (``cnnkit.data.builtins``);
- an image folder or a CSV file of ``path,label`` lines (``cnnkit.data.readers``);
- tar shards written by ``cnnkit shard`` (``cnnkit.data.shards``).

``DataConfig.val`` / ``DataConfig.test`` name an explicit folder of class subfolders, CSV or
shards. Without a validation split, one is carved from train: stratified, seeded by the run seed.

One build, in order: read the source; channels and input size from the training images
(``cnnkit.data.stats``); the train ``Augment``, resolved here once; the pre-flight, which decodes
every file split that fits the decode budget once (its check) and checks the others; the carved
validation split; mean/std; the transforms.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from cnnkit.config import DataConfig
from cnnkit.data import augment, cache, shards, stats
from cnnkit.data.augment import Augment
from cnnkit.data.datasets import (
    Decoded,
    FileImageDataset,
    Source,
    existing_path,
    labelled,
    read_eval,
    read_local,
)
from cnnkit.data.doctor import Finding, check_files, error_kind
from cnnkit.data.host import cache_root
from cnnkit.data.images import ImageFileError
from cnnkit.data.loader import auto_workers
from cnnkit.data.readers import short, stratified_split
from cnnkit.data.transforms import eval_transform, image_mode, make_preprocessing, train_transform
from cnnkit.errors import CnnkitError

SPLITS = ("train", "val", "test")
SHOWN_BAD = 10  # bad files named in the error that stops a run


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


def build(cfg: DataConfig, seed: int, note: Callable[[str], None] | None = None) -> Splits:
    """Read ``cfg.source`` into train/val/test datasets with their transforms and description.

    Input size and channels: see ``cnnkit.data.stats``. Mean/std: ``cfg.mean``/``cfg.std`` when
    set, else published values for built-ins (digits: its fixed train split), else measured on
    the training images. Val: ``cfg.val``, a val/ folder, else carved from train
    (``cfg.val_fraction``, stratified, seeded by ``seed``).
    """
    _check_ranges(cfg)
    src = read_source(cfg)
    in_chans, input_size, crop = stats.geometry(src.train, cfg.input_size)
    aug = augment.resolve(cfg, input_size, src.preset)
    streamed = isinstance(src.train, shards.ShardDataset)
    if streamed and aug.hflip == "alternate":
        raise CnnkitError(
            "data.hflip=alternate flips each image by its index, which streamed tar shards do "
            "not have; use a probability, e.g. data.hflip=0.5"
        )
    plain = make_preprocessing(in_chans, input_size, [0.0] * in_chans, [1.0] * in_chans, crop)
    src, skipped = preflight(src, cfg, plain, aug, note)
    train, val = _carve_val(src, cfg, seed, streamed)
    mean, std = _normalisation(cfg, src, train, plain)
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


def peek(cfg: DataConfig) -> tuple[float, int]:
    """(median shorter side in px, number of training images) of ``cfg.source``, from file
    headers or a built-in's known size, without decoding: what ``model: auto`` chooses by."""
    side = stats.builtin_side(cfg.source)
    if side is not None:
        return side, 0
    src = read_source(cfg)
    return stats.native_side(src.train), len(src.train)


def _check_ranges(cfg: DataConfig) -> None:
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise CnnkitError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.input_size is not None and cfg.input_size < 1:
        raise CnnkitError(
            f"data.input_size must be a positive number of pixels or null, got {cfg.input_size}"
        )


def _carve_val(src: Source, cfg: DataConfig, seed: int, streamed: bool):
    """(train, val): a validation split carved from train when the source has none."""
    train, val = src.train, src.val
    if streamed:
        train.seed = seed  # shard order and shuffle buffers follow the run's seed
    elif val is None and cfg.val_fraction > 0:  # shards cannot be carved: give data.val
        keep, held = stratified_split(train.targets, cfg.val_fraction, seed)
        train, val = train.subset(keep), (train.subset(held) if held else None)
    return train, val


def _normalisation(cfg: DataConfig, src: Source, train, plain: dict) -> stats.Stats:
    if cfg.mean is not None or cfg.std is not None:
        return stats.given(cfg.mean, cfg.std, plain["in_chans"])
    if src.mean is None:
        return stats.measured(train, plain)
    return src.mean, src.std


# ---------------------------------------------------------------------------------------------
# Pre-flight: no bad file meets training by surprise


def preflight(
    src: Source,
    cfg: DataConfig,
    plain: dict,
    aug: Augment,
    note: Callable[[str], None] | None = None,
) -> tuple[Source, list]:
    """``src`` with its file splits checked, decoding each file once; and the bad files found.

    File splits that fit the decode budget (``cache.DecodeBudget``) are decoded into the
    decode-once cache (``cnnkit.data.cache``): that full decode is their check, and the returned
    datasets carry the decoded images for the loaders. Other file splits are checked with the
    doctor's cached scan when ``data.check_files``. Bad files stop the run, naming them, unless
    ``cfg.skip_bad``: then they are left out of their split and returned (as ``doctor.Finding``)
    for the run folder's list. ``plain``: the preprocessing without mean/std; ``aug``: the train
    augmentation (random resized crops keep larger images).
    """
    budget = cache.DecodeBudget(cfg.decode_cache, cfg.cache_memory)
    files = {n: getattr(src, n) for n in SPLITS if isinstance(getattr(src, n), FileImageDataset)}
    if not files:
        return src, []
    note, root, mode = note or cache.stderr_note, cache_root(cfg.cache_dir), image_mode(plain)
    checked, bad, unchecked = dict(files), [], []
    for name, dataset in files.items():
        geometry = cache.stored_geometry(plain, name == "train" and aug.random_resized_crop)
        if not budget.take(cache.decoded_bytes(len(dataset), mode, geometry)):
            unchecked.append(dataset)  # streams; run_loader says so when it makes the loader
            continue
        images, failures = cache.decode_checked(
            dataset.paths, dataset.stats, mode, geometry, root, auto_workers(dataset), note
        )
        checked[name] = dataset.with_decoded(Decoded(images, geometry))
        bad += _findings(dataset, failures)
    if cfg.check_files and unchecked:
        bad += check_files([p for dataset in unchecked for p in dataset.paths], cache_dir=root)
    if bad and not cfg.skip_bad:
        _refuse(bad)
    dropped = {f.path for f in bad}
    kept = {name: _without(dataset, dropped) for name, dataset in checked.items()}
    return dataclasses.replace(src, **kept), bad


def _findings(dataset: FileImageDataset, failures: list[tuple[int, str]]) -> list[Finding]:
    """The decode failures (index, message) of ``dataset`` as the doctor reports them."""
    found = []
    for i, message in failures:
        path = os.fspath(dataset.paths[i])
        if dataset.stats[i][0] == 0:  # as the doctor says it
            found.append(Finding(path, "empty", f"{path} is empty (0 bytes)"))
        else:
            found.append(Finding(path, error_kind(message), message))
    return found


def _refuse(bad: list[Finding]) -> None:
    shown = "; ".join(f"{f.path} ({f.kind})" for f in bad[:SHOWN_BAD])
    more = f" and {len(bad) - SHOWN_BAD} more" if len(bad) > SHOWN_BAD else ""
    raise ImageFileError(
        f"{len(bad)} image file(s) cannot be used: {shown}{more}. Fix or remove them, or "
        "train with --skip-bad to leave them out (cnnkit doctor DATA gives the full report)"
    )


def _without(dataset: FileImageDataset, dropped: set[str]) -> FileImageDataset:
    if not dropped:
        return dataset
    return dataset.subset([i for i, p in enumerate(dataset.paths) if os.fspath(p) not in dropped])


# ---------------------------------------------------------------------------------------------
# Reading sources


def read_source(cfg: DataConfig) -> Source:
    """The source ``cfg`` names, read into datasets without transforms; ``cfg.val`` and
    ``cfg.test`` replace the source's own splits."""
    if shards.is_shard_source(cfg.source):
        src = _shard_source(cfg.source)
    else:
        src = read_local(cfg.source, cache_root(cfg.cache_dir))
    if cfg.val is not None:
        src.val = _eval_split(cfg.val, src.classes)
    if cfg.test is not None:
        src.test = _eval_split(cfg.test, src.classes)
    return src


def _shard_source(source: str) -> Source:
    train = shards.shard_dataset(source, shuffle=True)
    name = Path(train.urls[0]).parent.name or "shards"
    return Source(name, train.classes, train, None, None, shards.fingerprint(train))


def _eval_split(source: str, classes: list[str]):
    """An explicit val/test source: tar shards, a folder of class subfolders or a CSV."""
    if not shards.is_shard_source(source):
        return labelled(existing_path(source), classes)
    dataset = shards.shard_dataset(source, shuffle=False)
    if dataset.classes != list(classes):
        raise CnnkitError(
            f"the shards {source} have classes {short(dataset.classes)}, the training data "
            f"{short(classes)}"
        )
    return dataset


def build_eval(
    source: str, classes: list[str], preprocessing: dict, cache_dir: str | None = None
) -> Dataset:
    """Labelled eval dataset for a trained model (see ``datasets.read_eval``) with
    ``eval_transform(preprocessing)``. ``cache_dir``: where built-ins are stored (as
    ``data.cache_dir``; default: the cache folder)."""
    dataset = read_eval(source, classes, cache_root(cache_dir))
    return dataset.with_transform(eval_transform(preprocessing), image_mode(preprocessing))
