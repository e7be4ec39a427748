"""Folder and CSV layouts -> file paths and integer targets, per split. Free of torch.

Layouts (the rules training, ``cnnkit shard`` and ``cnnkit doctor`` all read folders by):

- an image folder: ``root/train/<class>/*`` with ``root/val`` (or ``valid``, ``validation``)
  and/or ``root/test`` holding the same class folders; or just ``root/<class>/*``. Class
  folders are the subfolders that are not junk (``images.is_junk``); their images are listed
  recursively by ``images.scan_images``.
- a CSV file of ``path,label`` lines (a header line is optional; paths are relative to the CSV's
  folder; extra columns are ignored).

Class names sort numerically when all are integers ("2" before "10"), else as text.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.config import DataConfig
from cnnkit.data.images import IMAGE_EXTENSIONS, file_stat, is_junk, list_images, scan_images
from cnnkit.errors import CnnkitError

VAL_DIRS = ("val", "valid", "validation")  # the first that exists is the validation split
PATH_HEADERS = frozenset({"path", "file", "filename", "file_name", "image", "img", "filepath"})
LABEL_HEADERS = frozenset({"label", "class", "target", "category"})


@dataclass
class Listing:
    """One split's files: paths, target class indices, and (size, mtime_ns) per file when the
    listing stat-ed them (None: taken later, when needed)."""

    paths: list
    targets: list[int]
    stats: list[tuple[int, int]] | None = None


@dataclass
class Layout:
    """A folder or CSV source as listed: its classes and the listings of its splits."""

    name: str
    classes: list[str]
    train: Listing
    val: Listing | None
    test: Listing | None
    fingerprint: str  # changes when a file, a label or a class name changes


# ---------------------------------------------------------------------------------------------
# Folders


def split_folders(root: Path) -> dict[str, Path]:
    """The split folders of ``root``: train/ with val/ (or valid/, validation/) and test/ when
    root/train exists, else root itself is the training split."""
    if not (root / "train").is_dir():
        return {"train": root}
    found = {"train": root / "train"}
    val = next((root / name for name in VAL_DIRS if (root / name).is_dir()), None)
    if val is not None:
        found["val"] = val
    if (root / "test").is_dir():
        found["test"] = root / "test"
    return found


def class_dirs(folder: Path) -> list[Path]:
    """The class folders of a split folder: its subfolders that are not junk, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_junk(p.name))


def eval_folder(root: Path) -> Path:
    """The folder to evaluate in a source: test/, else val/ for a train/ layout, else root."""
    folders = split_folders(root)
    if folders["train"] == root:
        return root
    if "test" in folders or "val" in folders:
        return folders.get("test", folders.get("val"))
    raise CnnkitError(
        f"{root} has a train/ folder but no test/ or val/ folder to evaluate on; "
        "give the folder of the images to evaluate"
    )


def read_layout(path: Path) -> Layout:
    """A folder of class folders (with or without split folders) or a CSV, as listed."""
    if path.is_file():
        return _read_csv_layout(path)
    folders = split_folders(path)
    classes, train = _class_folders(folders["train"])
    val = _labelled_folder(folders["val"], classes) if "val" in folders else None
    test = _labelled_folder(folders["test"], classes) if "test" in folders else None
    fingerprint = files_fingerprint(path, classes, train, val, test)
    return Layout(path.resolve().name, classes, train, val, test, fingerprint)


def read_labelled(path: Path, classes: list[str]) -> Listing:
    """An explicit val/test/eval source (folder of class folders or CSV) against ``classes``."""
    if path.is_dir():
        return _labelled_folder(path, classes)
    if path.suffix.lower() != ".csv":
        raise CnnkitError(
            f"{path} is a file but not a .csv; give a folder of class subfolders or a CSV of "
            "path,label lines"
        )
    return _csv_listing(path, _read_csv(path), classes)


def _class_folders(folder: Path) -> tuple[list[str], Listing]:
    """Classes (sorted class folder names) and the listing of their images."""
    subdirs = class_dirs(folder)
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
    classes = sort_labels({d.name for d in subdirs})
    return classes, _labelled_folder(folder, classes)


def _labelled_folder(folder: Path, classes: list[str]) -> Listing:
    """Images of ``folder``/<class>/, labelled by the index of <class> in ``classes``."""
    index = {name: i for i, name in enumerate(classes)}
    subdirs = class_dirs(folder)
    if not subdirs:
        raise CnnkitError(f"no class subfolders in {folder}: expected {folder}/<class>/<image>")
    listing = Listing([], [], [])
    for sub in sorted(subdirs, key=lambda d: index.get(d.name, -1)):
        if sub.name not in index:
            raise CnnkitError(
                f"class folder {sub} is not a training class {short(classes)}; rename or remove it"
            )
        files = scan_images(sub)
        if not files:
            raise CnnkitError(
                f"class folder {sub} has no images ({' '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        listing.paths += [path for path, _, _ in files]
        listing.stats += [(size, mtime) for _, size, mtime in files]
        listing.targets += [index[sub.name]] * len(files)
    return listing


# ---------------------------------------------------------------------------------------------
# CSV files


def _read_csv_layout(path: Path) -> Layout:
    if path.suffix.lower() != ".csv":
        raise CnnkitError(
            f"data source {path} is a file but not a .csv; give a folder of class subfolders, "
            "a CSV of path,label lines or a built-in dataset name"
        )
    rows = _read_csv(path)
    classes = sort_labels({label for _, label in rows})
    train = _csv_listing(path, rows, classes)
    fingerprint = files_fingerprint(path.parent, classes, train, None, None)
    return Layout(path.stem, classes, train, None, None, fingerprint)


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


def _csv_listing(path: Path, rows: list[tuple[Path, str]], classes: list[str]) -> Listing:
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({label for _, label in rows if label not in index})
    if unknown:
        raise CnnkitError(
            f"CSV {path} has labels that are not training classes: "
            f"{short(unknown)}; known classes: {short(classes)}"
        )
    return Listing([p for p, _ in rows], [index[label] for _, label in rows])


# ---------------------------------------------------------------------------------------------
# Labels, fingerprints and splitting


def sort_labels(labels: set[str]) -> list[str]:
    """Class names in order: numerically when all are integers ("2" before "10"), else by text."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def file_stats(listing: Listing) -> list[tuple[int, int]]:
    """(size, mtime_ns) per file of ``listing``; stat-ed now (once) when the listing has none."""
    if listing.stats is None:
        listing.stats = [file_stat(path) for path in listing.paths]
    return listing.stats


def files_fingerprint(root: Path, classes: list[str], *splits: Listing | None) -> str:
    """Hash of every split's (relative path, size, mtime, label) and the class names."""
    digest = hashlib.sha256("\n".join(classes).encode())
    prefix = os.path.join(os.fspath(root), "")
    for name, listing in zip(("train", "val", "test"), splits, strict=True):
        if listing is None:
            continue
        rows = zip(listing.paths, file_stats(listing), listing.targets, strict=True)
        for path, (size, mtime), label in rows:
            text = os.fspath(path)
            # a plain prefix cut: os.path.relpath costs ~20 us a file (1 s for CIFAR-10)
            rel = text[len(prefix) :] if text.startswith(prefix) else os.path.relpath(text, root)
            digest.update(f"{name}\t{rel}\t{size}\t{mtime}\t{label}\n".encode())
    return digest.hexdigest()[:16]


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


def short(names: Sequence[str], limit: int = 8) -> str:
    """``[a, b, ...]``: up to ``limit`` names for an error message."""
    shown = ", ".join(map(str, names[:limit]))
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


# ---------------------------------------------------------------------------------------------
# Image and mask folders (segmentation; decoded by cnnkit.data.masks, checked by the doctor)

PAIR_DIRS = (("images", "masks"), ("image", "label"), ("images", "labels"), ("image", "mask"))
BINARY_CLASSES = ["background", "foreground"]


@dataclass
class Pairs:
    """Image and mask files of two folders matched by file stem."""

    pairs: list[tuple[Path, Path]]  # (image, mask), in image order
    missing: list[Path]  # images without a mask
    orphans: list[Path]  # masks without an image
    doubles: list[tuple[Path, Path]]  # two masks with one stem: (the one kept, the other)


def pair_dirs(folder: Path, cfg: DataConfig) -> tuple[Path, Path] | None:
    """(image folder, mask folder) inside ``folder``, or None when it has no such pair."""
    pairs = PAIR_DIRS
    if cfg.image_dir or cfg.mask_dir:
        pairs = ((cfg.image_dir or "images", cfg.mask_dir or "masks"),)
    for images, masks in pairs:
        if (folder / images).is_dir() and (folder / masks).is_dir():
            return folder / images, folder / masks
    return None


def is_mask_source(cfg: DataConfig) -> bool:
    """True when ``cfg.source`` is a folder of image and mask folders (at its root or in
    train/): what makes ``cnnkit train DATA`` a segmentation run."""
    root = Path(cfg.source).expanduser()
    return root.is_dir() and any(pair_dirs(f, cfg) for f in (root, root / "train"))


def match_pairs(images: Path, masks: Path) -> Pairs:
    """The files of ``images`` and ``masks`` (``list_images`` of each) matched by stem."""
    by_stem: dict[str, Path] = {}
    doubles = []
    for mask in list_images(masks):
        if mask.stem in by_stem:
            doubles.append((by_stem[mask.stem], mask))
        else:
            by_stem[mask.stem] = mask
    pairs, missing, used = [], [], set()
    for image in list_images(images):
        if image.stem in by_stem:
            pairs.append((image, by_stem[image.stem]))
            used.add(image.stem)
        else:
            missing.append(image)
    orphans = [mask for stem, mask in by_stem.items() if stem not in used]
    return Pairs(pairs, missing, orphans, doubles)


def read_class_names(root: Path) -> list[str] | None:
    """Names from classes.txt (a line each) or classes.json (a list), else None."""
    text_file, json_file = root / "classes.txt", root / "classes.json"
    if text_file.is_file():
        names = [line.strip() for line in text_file.read_text().splitlines() if line.strip()]
    elif json_file.is_file():
        names = json.loads(json_file.read_text())
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CnnkitError(f"{json_file} must hold a list of class names")
    else:
        return None
    if len(names) < 2:
        raise CnnkitError(f"{root}: a class file must name at least 2 classes, got {names}")
    return names
