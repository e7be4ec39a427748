"""``cnnkit doctor`` on a segmentation folder: images paired with masks (the layouts of
``cnnkit.data.masks``: ``images/`` + ``masks/`` and the other pairs of ``readers.PAIR_DIRS``, at
the root or per split under ``train/``, ``val/``, ``test/``).

``scan_pairs(root)`` checks what training would refuse, and what it would not but should be
known, in one ``doctor.Report``:

- errors: an image without its mask, two masks with one stem, a mask that cannot be read or is a
  colour image, a mask of another size than its image, mask values outside the classes (neither
  a class index nor the ignore value 255); the images' own decode errors and duplicates across
  splits, as for classification (``doctor.scan``);
- warnings: masks without an image (training leaves them out), classes absent from every
  training mask, pixel imbalance (the largest class has ``PIXEL_IMBALANCE_RATIO`` times the
  pixels of the smallest or more: ``--balance loss`` is suggested), the images' own warnings.

Per split, ``classes`` counts the images holding each class and ``pixels`` gives each class's
share of the valid pixels. Masks are read with ``images.load_mask`` (no torch: the doctor starts
fast), classes from ``classes.txt``/``classes.json`` as training reads them, else 0/255 binary
masks or the largest value found.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from cnnkit.config import DataConfig
from cnnkit.data.doctor import Finding, Report, file_findings, find_duplicates, inspect_files
from cnnkit.data.images import ImageFileError, load_mask
from cnnkit.data.readers import (
    BINARY_CLASSES,
    Pairs,
    is_mask_source,
    match_pairs,
    pair_dirs,
    read_class_names,
    split_folders,
)
from cnnkit.errors import CnnkitError

IGNORE = 255  # mask value of pixels not scored (data.ignore_index's default)
# Background commonly holds 3-5x the pixels of the objects: a tenth is where per-pixel class
# weights (--balance loss) start to matter for the small classes.
PIXEL_IMBALANCE_RATIO = 10.0
ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def is_pair_folder(root: str | os.PathLike) -> bool:
    """True when ``root`` holds image and mask folders, as ``cnnkit train`` would read it."""
    return is_mask_source(DataConfig(source=str(root)))


def scan_pairs(
    root: str | os.PathLike,
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Report:
    """Check every image and mask of the segmentation folder ``root``; see the module docstring."""
    start = time.perf_counter()
    root = Path(root)
    report = Report(root=str(root))
    splits = _pair_splits(root)
    images = {str(i): split for split, found in splits.items() for i in _images(found)}
    results, report.cached = inspect_files(list(images), workers, cache_dir=cache_dir)
    report.images = len(images)
    file_findings(results, report)
    for found in splits.values():
        _pairing_findings(found, report)
    counts = _mask_counts(splits, results, report)
    _class_pixels(counts, read_class_names(root), report)
    find_duplicates(results, images, report)
    report.seconds = time.perf_counter() - start
    return report


def _pair_splits(root: Path) -> dict[str, Pairs]:
    if not root.is_dir():
        raise CnnkitError(f"doctor: {root} is not a folder of images")
    cfg = DataConfig(source=str(root))
    at_root = pair_dirs(root, cfg)
    if at_root is not None:
        return {"train": match_pairs(*at_root)}
    found = {}
    for split, folder in split_folders(root).items():
        if (pair := pair_dirs(folder, cfg)) is not None:
            found[split] = match_pairs(*pair)
    if "train" not in found:
        raise CnnkitError(f"doctor: {root} has no image and mask folders (or in train/)")
    return found


def _images(found: Pairs) -> list[Path]:
    return [image for image, _ in found.pairs] + found.missing


def _pairing_findings(found: Pairs, report: Report) -> None:
    for image in found.missing:
        why = f"no mask for image {image}: masks are matched by file stem"
        report.errors.append(Finding(str(image), "missing_mask", why))
    for kept, other in found.doubles:
        why = f"two masks for stem '{other.stem}': {kept}, {other}"
        report.errors.append(Finding(str(other), "double_mask", why))
    for mask in found.orphans:
        why = "mask without an image (no image has its stem): left out"
        report.warnings.append(Finding(str(mask), "orphan_mask", why))


def _mask_counts(splits: dict[str, Pairs], results: dict, report: Report) -> list:
    """(split, mask path, count of each value 0..255) of every readable mask of its image's
    size; the others become errors."""
    counts = []
    for split, found in splits.items():
        for image, mask in found.pairs:
            try:
                values = load_mask(mask)
            except ImageFileError as e:
                report.errors.append(Finding(str(mask), "bad_mask", str(e)))
                continue
            size = _upright_size(results[str(image)].get("facts"))
            if size is not None and size != (values.shape[1], values.shape[0]):
                why = (
                    f"mask {mask} is {values.shape[1]}x{values.shape[0]} but its image {image} "
                    f"is {size[0]}x{size[1]}; they must match"
                )
                report.errors.append(Finding(str(mask), "mask_size", why))
                continue
            counts.append((split, mask, np.bincount(values.ravel(), minlength=256)))
    return counts


def _upright_size(facts: dict | None) -> tuple[int, int] | None:
    """(width, height) of the image as training decodes it (EXIF-rotated); None if undecodable."""
    if facts is None:
        return None
    width, height = facts["width"], facts["height"]
    return (height, width) if facts["orientation"] in ROTATED else (width, height)


def _class_pixels(counts: list, names: list[str] | None, report: Report) -> None:
    """Values outside the classes, and per split the images holding each class and its share
    of the pixels."""
    values = sum((c for _, _, c in counts), np.zeros(256, np.int64))
    binary = (names is None or len(names) == 2) and values[255] > 0 and not values[1:255].any()
    if binary:  # 0/255 masks: 255 is the second class, nothing is ignored
        classes = names or BINARY_CLASSES
        counts = [(s, m, np.array([c[0], c[255]])) for s, m, c in counts]
    else:
        top = int(np.flatnonzero(values[:IGNORE]).max(initial=0))
        classes = names or [f"class_{i}" for i in range(max(top + 1, 2))]
        counts = [(s, m, _checked(m, c, len(classes), report)) for s, m, c in counts]
    for split in dict.fromkeys(s for s, _, _ in counts):
        rows = [c for s, _, c in counts if s == split]
        pixels = np.sum(rows, axis=0)
        holding = np.count_nonzero(rows, axis=0).tolist()
        report.classes[split] = dict(zip(classes, holding, strict=True))
        shares = (pixels / max(pixels.sum(), 1)).tolist()
        report.pixels[split] = dict(zip(classes, shares, strict=True))
        if (pixels > 0).any():
            report.imbalance[split] = float(pixels.max() / pixels[pixels > 0].min())
    _imbalance(report)


def _checked(mask: Path, counts: np.ndarray, k: int, report: Report) -> np.ndarray:
    """The counts of the ``k`` classes; values that are neither a class nor IGNORE: an error."""
    bad = [v for v in np.flatnonzero(counts).tolist() if v >= k and v != IGNORE]
    if bad:
        why = (
            f"mask {mask} has values {bad[:8]} outside the {k} classes (0..{k - 1}, ignore "
            f"{IGNORE}); fix the mask or the class file"
        )
        report.errors.append(Finding(str(mask), "mask_values", why))
    return counts[:k]


def _imbalance(report: Report) -> None:
    train = report.classes.get("train", {})
    for name, images in train.items():
        if images == 0:
            why = f"class {name} is in no training mask: the model cannot learn it"
            report.warnings.append(Finding(f"train/{name}", "absent_class", why))
    ratio = report.imbalance.get("train", 1.0)
    if ratio >= PIXEL_IMBALANCE_RATIO:
        report.balance = "loss"
        why = f"largest/smallest class = {ratio:.1f} by pixels; --balance loss"
        report.warnings.append(Finding("train", "imbalance", why))
