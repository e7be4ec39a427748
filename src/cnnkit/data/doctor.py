"""Dataset health scan: every file fully decoded (in parallel), odd files, classes and duplicates.

``scan(root)`` reads a folder laid out as training reads it (``root/<class>/*`` or
``root/{train,val,test}/<class>/*``, the rules of ``cnnkit.data.readers``) and returns a
``Report``:

- errors (training cannot use the file): zero-byte, unreadable or truncated, not an image despite
  its extension, over the decompression-bomb limit; empty classes; duplicates across splits
  (train/test leakage), exact (same bytes) or near (perceptual hashes within ``NEAR_BITS`` bits);
- warnings: unusual modes (CMYK, RGBA, LA, P with transparency, 16-bit, float), EXIF-rotated,
  tiny or extreme-aspect images, hidden/junk files, non-image files, duplicates within a split,
  class imbalance (max/min count).

Decoding goes through ``images.decode``, the policy training uses. Per-file results are cached by
fingerprint (absolute path, size, mtime) in one small JSON file per folder under
``<cache folder>/doctor`` (``data.cache_dir``; by default ``$CNNKIT_CACHE_DIR`` or
``~/.cache/cnnkit``, see ``host.cache_root``), so a rescan of unchanged files only stats them;
``check_files`` (the pre-flight check before training) shares that cache.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import PIL

from cnnkit.data import duplicates
from cnnkit.data.host import cache_root, cpu_count
from cnnkit.data.images import ImageFileError, decode, is_image_file, is_junk
from cnnkit.data.readers import class_dirs, split_folders
from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_write_bytes

CACHE_VERSION = f"doctor-1/pillow-{PIL.__version__}"  # a new Pillow may decode differently
UNUSUAL_MODES = frozenset({"CMYK", "RGBA", "LA", "PA", "I", "I;16", "I;16B", "I;16L", "F", "1"})
TINY_SIDE = 16  # px: a shorter side below this is reported
MAX_ASPECT = 4.0  # longer / shorter side above this is reported
NEAR_BITS = 4  # perceptual hashes (64 bits) this close count as near duplicates
IMBALANCE_RATIO = 3.0  # largest / smallest class at or above this: classes are imbalanced
IN_PROCESS_BELOW = 64  # fewer files than this are checked without starting worker processes
SHOWN = 10  # lines per section in the human summary


@dataclass
class Finding:
    path: str
    kind: str  # empty | unreadable | not_image | bomb | mode | exif | tiny | aspect | junk | ...
    message: str


@dataclass
class Report:
    root: str
    images: int = 0
    seconds: float = 0.0
    cached: int = 0  # files whose result came from the cache
    classes: dict = field(default_factory=dict)  # split -> {class: image count}
    imbalance: dict = field(default_factory=dict)  # split -> largest / smallest class count
    errors: list = field(default_factory=list)  # Finding
    warnings: list = field(default_factory=list)  # Finding
    exact_duplicates: list = field(default_factory=list)  # {"a", "b", "cross_split"}
    near_duplicates: list = field(default_factory=list)  # {"a", "b", "cross_split", "bits"}
    balance: str = "none"  # suggested --balance
    pixels: dict = field(default_factory=dict)  # image/mask pairs: split -> {class: pixel share}

    @property
    def leaks(self) -> list[dict]:
        return [p for p in self.exact_duplicates + self.near_duplicates if p["cross_split"]]

    @property
    def ok(self) -> bool:
        return not self.errors and not self.leaks

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(ok=self.ok, leaks=len(self.leaks), images_per_s=self.images / self.seconds)
        return out


# ---------------------------------------------------------------------------------------------
# One file


def inspect_file(path: str, phash: bool = True) -> dict:
    """Decode one file fully: {size, sha (content hash), phash, facts} or {size, error, kind}.
    ``phash=False`` leaves out the perceptual hash (which costs more than decoding a small
    image): enough for the pre-flight check; the doctor adds it when it needs it."""
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as e:  # vanished or unreadable since the folder was listed
        return {"size": 0, "kind": "unreadable", "error": f"cannot read {path}: {e.strerror}"}
    size = len(content)
    if size == 0:
        return {"size": 0, "kind": "empty", "error": f"{path} is empty (0 bytes)"}
    sha = hashlib.blake2b(content, digest_size=16).hexdigest()
    try:
        image, facts = decode(path, "RGB")
    except ImageFileError as e:
        return {"size": size, "sha": sha, "kind": error_kind(str(e)), "error": str(e)}
    record = {"size": size, "sha": sha, "facts": facts}
    if phash:
        record["phash"] = _phash(image)
    return record


def _phash(image) -> str:
    import imagehash  # deferred: scipy import costs ~0.3 s and only the doctor needs it

    return str(imagehash.phash(image))


def _what_policy_does(facts: dict) -> str:
    if facts["transparency"]:
        return "transparency composited onto white"
    if facts["mode"] in ("I", "I;16", "I;16B", "I;16L", "F"):
        return "scaled to 8 bits"
    return "converted to RGB"


def error_kind(message: str) -> str:
    if "not an image file" in message:
        return "not_image"
    if "pixels" in message and "limit" in message:
        return "bomb"
    return "unreadable"


def _file_warnings(path: str, facts: dict) -> list[Finding]:
    found = []
    mode = facts["mode"]
    if mode in UNUSUAL_MODES or (mode == "P" and facts["transparency"]):
        detail = " with transparency" if mode == "P" else ""
        found.append(Finding(path, "mode", f"mode {mode}{detail}: {_what_policy_does(facts)}"))
    if facts["orientation"] != 1:
        found.append(Finding(path, "exif", f"EXIF orientation {facts['orientation']}: rotated"))
    short, long = sorted((facts["width"], facts["height"]))
    if short < TINY_SIDE:
        found.append(Finding(path, "tiny", f"{facts['width']}x{facts['height']} px is tiny"))
    elif long / short > MAX_ASPECT:
        found.append(Finding(path, "aspect", f"{facts['width']}x{facts['height']} px aspect"))
    return found


# ---------------------------------------------------------------------------------------------
# Many files, cached


def inspect_files(
    paths: Sequence,
    workers: int | None = None,
    phash: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[dict, int]:
    """{path: inspect_file result} for every path, reusing results cached under ``cache_dir``
    (``data.cache_dir``; None: the default cache folder); (results, cached)."""
    cache = _Cache(cache_root(cache_dir))
    results, todo = {}, []
    for path in map(str, paths):
        hit = cache.get(path)
        if hit is None or (phash and "phash" not in hit and "error" not in hit):
            todo.append(path)
        else:
            results[path] = hit
    for path, record in zip(todo, _run_parallel(todo, workers, phash), strict=True):
        results[path] = record
        cache.put(path, record)
    cache.save()
    return results, len(paths) - len(todo)


def check_files(
    paths: Sequence, workers: int | None = None, cache_dir: str | os.PathLike | None = None
) -> list[Finding]:
    """The files among ``paths`` that cannot be decoded (pre-flight check before training)."""
    results, _ = inspect_files(paths, workers, phash=False, cache_dir=cache_dir)
    return [
        Finding(path, rec["kind"], rec["error"]) for path, rec in results.items() if "error" in rec
    ]


def _run_parallel(names: Sequence[str], workers: int | None, phash: bool = True) -> list[dict]:
    workers = workers or cpu_count()
    inspect = inspect_file if phash else partial(inspect_file, phash=False)
    if len(names) < IN_PROCESS_BELOW or workers <= 1:
        return [inspect(n) for n in names]
    # fork: workers start in milliseconds and only use Pillow/numpy (no torch threads)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    chunk = max(1, min(256, len(names) // (workers * 8)))
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(inspect, names, chunksize=chunk))


class _Cache:
    """Per-folder JSON files of {file name: [size, mtime_ns, record]}; stale entries are redone."""

    def __init__(self, root: Path) -> None:
        self.folder = root / "doctor"
        self.shards: dict[str, dict] = {}
        self.dirty: set[str] = set()

    def get(self, path: str) -> dict | None:
        folder, name = os.path.split(path)
        entry = self._shard(folder).get(name)
        if entry is None:
            return None
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return entry[2] if entry[:2] == [stat.st_size, stat.st_mtime_ns] else None

    def put(self, path: str, record: dict) -> None:
        folder, name = os.path.split(path)
        try:
            stat = os.stat(path)
        except OSError:
            return  # gone: nothing to remember
        self._shard(folder)[name] = [stat.st_size, stat.st_mtime_ns, record]
        self.dirty.add(folder)

    def save(self) -> None:
        for folder in self.dirty:
            data = {"version": CACHE_VERSION, "folder": folder, "files": self.shards[folder]}
            try:
                atomic_write_bytes(self._file(folder), json.dumps(data).encode())
            except (OSError, CnnkitError):
                return  # a read-only cache folder only costs speed
        self.dirty.clear()

    def _shard(self, folder: str) -> dict:
        if folder not in self.shards:
            self.shards[folder] = self._read(folder)
        return self.shards[folder]

    def _read(self, folder: str) -> dict:
        try:
            data = json.loads(self._file(folder).read_text())
        except (OSError, ValueError):
            return {}
        ok = data.get("version") == CACHE_VERSION and data.get("folder") == folder
        return data["files"] if ok else {}

    def _file(self, folder: str) -> Path:
        key = hashlib.blake2b(os.path.abspath(folder).encode(), digest_size=10).hexdigest()
        return self.folder / f"{key}.json"


# ---------------------------------------------------------------------------------------------
# A dataset folder


def scan(
    root: str | os.PathLike,
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Report:
    """Check every file of the dataset folder ``root``; see the module docstring. ``cache_dir``:
    the cache folder (``data.cache_dir``; None: the default)."""
    start = time.perf_counter()
    root = Path(root)
    if not root.is_dir():
        raise CnnkitError(f"doctor: {root} is not a folder of images")
    report = Report(root=str(root))
    images = _walk(root, report)  # {path: (split, class)}
    results, report.cached = inspect_files(list(images), workers, cache_dir=cache_dir)
    report.images = len(images)
    file_findings(results, report)
    _count_classes(images, results, report)
    find_duplicates(results, {p: images[p][0] for p in results}, report)
    report.seconds = time.perf_counter() - start
    return report


def file_findings(results: dict, report: Report) -> None:
    """Each file's decode error or warnings (``inspect_files`` results) into ``report``."""
    for path, rec in results.items():
        if "error" in rec:
            report.errors.append(Finding(path, rec["kind"], rec["error"]))
        else:
            report.warnings.extend(_file_warnings(path, rec["facts"]))


def find_duplicates(results: dict, splits: dict[str, str], report: Report) -> None:
    """Exact and near duplicates among ``results`` (``splits``: path -> split) into ``report``."""
    report.exact_duplicates = duplicates.exact(results, splits)
    exact = {(d["a"], d["b"]) for d in report.exact_duplicates}
    near = duplicates.near(results, splits, NEAR_BITS)
    report.near_duplicates = [d for d in near if (d["a"], d["b"]) not in exact]


def _walk(root: Path, report: Report) -> dict[str, tuple[str, str]]:
    """Image files -> (split, class); junk, hidden and non-image files go to the warnings."""
    images = {}
    for split, folder in split_folders(root).items():
        classes = class_dirs(folder)
        report.classes[split] = {c.name: 0 for c in classes}
        _note_loose_files(folder, report)
        for cls in classes:
            for path in _files(cls, report):
                images[path] = (split, cls.name)
    return images


def _note_loose_files(folder: Path, report: Report) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file() or (path.is_dir() and is_junk(path.name)):
            junk = is_junk(path.name)
            why = "hidden/junk: ignored" if junk else "not inside a class folder: ignored"
            report.warnings.append(Finding(str(path), "junk" if junk else "loose", why))


def _files(folder: Path, report: Report) -> Iterable[str]:
    for top, dirs, names in os.walk(folder, followlinks=True):
        for d in sorted(d for d in dirs if is_junk(d)):
            report.warnings.append(Finding(str(Path(top, d)), "junk", "hidden/junk folder"))
        dirs[:] = sorted(d for d in dirs if not is_junk(d))
        for name in sorted(names):
            path = os.path.join(top, name)
            if is_junk(name):
                report.warnings.append(Finding(path, "junk", "hidden/junk file: ignored"))
            elif not is_image_file(name):
                report.warnings.append(Finding(path, "other", "not an image name: ignored"))
            else:
                yield path


def _count_classes(images: dict, results: dict, report: Report) -> None:
    for path, (split, cls) in images.items():
        if "error" not in results[path]:
            report.classes[split][cls] += 1
    worst = 1.0
    for split, counts in report.classes.items():
        for cls, n in counts.items():
            if n == 0:
                why = f"class {cls} of {split} has no usable images"
                report.errors.append(Finding(f"{split}/{cls}", "empty_class", why))
        present = [n for n in counts.values() if n > 0]
        if present:
            report.imbalance[split] = max(present) / min(present)
            worst = max(worst, report.imbalance[split]) if split == "train" else worst
    if worst >= IMBALANCE_RATIO:
        report.balance = "sampler"
        report.warnings.append(
            Finding(
                "train", "imbalance", f"largest/smallest class = {worst:.1f}; --balance sampler"
            )
        )


# ---------------------------------------------------------------------------------------------
# Human summary


def summary(report: Report) -> str:
    """The report as lines for a terminal: counts first, then each problem with its files."""
    lines = [
        f"doctor: {report.root}: {report.images} images in {report.seconds:.1f}s "
        f"({report.images / max(report.seconds, 1e-9):.0f} images/s, {report.cached} cached)"
    ]
    for split, counts in report.classes.items():
        ratio = report.imbalance.get(split)
        tail = f", imbalance {ratio:.1f}" if ratio else ""
        if split in report.pixels:  # pairs: counts are images holding the class
            shares = ", ".join(f"{c} {100 * v:.1f}%" for c, v in report.pixels[split].items())
            lines.append(f"  {split}: {len(counts)} classes, pixels {shares}{tail}")
            continue
        lines.append(f"  {split}: {sum(counts.values())} images, {len(counts)} classes{tail}")
    lines += _section("errors", [f"{f.kind}: {f.message}" for f in report.errors])  # names it
    leaks = [f"{p['a']} <-> {p['b']}" for p in report.leaks]
    lines += _section("duplicates across splits (leakage)", leaks)
    inner = [p for p in report.exact_duplicates + report.near_duplicates if not p["cross_split"]]
    lines += _section("duplicates within a split", [f"{p['a']} <-> {p['b']}" for p in inner])
    by_kind = Counter(f.kind for f in report.warnings)
    for kind in sorted(by_kind):
        found = [f"{f.path}: {f.message}" for f in report.warnings if f.kind == kind]
        lines += _section(f"warnings: {kind}", found)
    verdict = "clean" if report.ok else "problems found"
    lines.append(f"{verdict}; suggested --balance {report.balance}")
    return "\n".join(lines)


def _section(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    more = [f"    ... and {len(items) - SHOWN} more (see --json)"] if len(items) > SHOWN else []
    return [f"  {title}: {len(items)}", *(f"    {item}" for item in items[:SHOWN]), *more]
