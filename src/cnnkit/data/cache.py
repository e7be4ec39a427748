"""Decode once: image files -> one uint8 array at the stored resolution, persisted and reused.

Decoding a 32x32 JPEG costs ~0.12 ms of a core; doing it every epoch costs more than the forward
pass of a small network. When a split fits the memory budget, every file is decoded once, in
parallel processes, through the same ``load_image`` + resize/crop as the per-sample path, into a
(N, C, H, W) uint8 ``.npy`` file under ``<cache_dir>/decoded/``. Its name is a hash of the files
(path, size, mtime), the image mode and the stored geometry, so an unchanged dataset is read back
in a second and a changed file (or another input size) builds a new one. Files are written to a
temporary name and renamed, so a killed run never leaves a half-written cache behind.

The decode is complete (every pixel), so ``decode_checked`` doubles as the pre-flight check of
the files it covers: a file that cannot be decoded gets a row of zeros and is returned, with its
message, in a failure list saved beside the array (``<key>.json``), so a warm start reports the
same bad files without opening any. ``cnnkit.data.build`` decodes every file split that fits here
before the first epoch, and leaves the doctor's separate check to the splits that stream.

The budget is ``data.cache_memory`` GiB, or by default half of the memory available when the
split is loaded; above it the split streams from the files through DataLoader workers as before.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from cnnkit.data.images import MODE_CHANNELS, ImageFileError, file_stat, load_image
from cnnkit.data.transforms import INTERPOLATIONS
from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_write_bytes, fsync_dir  # same durability as run files

CACHE_VERSION = 2  # 2: failures kept beside the array
CHUNK = 256  # images per task of a decode worker
DEFAULT_BUDGET_FRACTION = 0.5  # of the memory available when a split is loaded


def stored_geometry(preprocessing: dict, random_resized_crop: bool) -> dict:
    """What the cache stores per image: the eval geometry, or for random resized crops of large
    inputs the square centre crop of side ``resize`` (e.g. 256 for 224) that crops come from."""
    size = list(preprocessing["input_size"])
    if random_resized_crop and preprocessing["crop"] == "center":
        side = preprocessing["resize"]
        return {"resize": side, "size": [side, side], "interpolation": "bilinear"}
    resize = preprocessing["resize"] if preprocessing["crop"] == "center" else size
    return {"resize": resize, "size": size, "interpolation": preprocessing["interpolation"]}


def geometry_ops(geometry: dict) -> v2.Compose:
    """PIL -> PIL resize (shorter side to an int, or straight to [H, W]) and centre crop."""
    interpolation = INTERPOLATIONS[geometry["interpolation"]]
    return v2.Compose(
        [
            v2.Resize(geometry["resize"], interpolation=interpolation, antialias=True),
            v2.CenterCrop(geometry["size"]),
        ]
    )


def stderr_note(message: str) -> None:
    """Default for notes: standard error, so ``--json`` output on stdout stays clean."""
    print(message, file=sys.stderr)


class DecodeBudget:
    """Which splits are decoded into memory (``data.decode_cache``): every one with "on", none
    with "off", and with "auto" those that fit ``data.cache_memory`` GiB (default: half the
    memory available when the budget is made), taken in turn."""

    def __init__(self, decode_cache: str, cache_memory: float | None) -> None:
        self.mode = decode_cache
        self.left = budget_bytes(cache_memory) if decode_cache == "auto" else None

    @property
    def limited(self) -> bool:
        """True when the budget is a number of bytes ("auto")."""
        return self.left is not None

    def take(self, nbytes: int) -> bool:
        """True, counting the bytes, when a split of ``nbytes`` decoded is held in memory."""
        if self.left is None:
            return self.mode == "on"
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True


def decoded_bytes(count: int, mode: str, geometry: dict) -> int:
    """Bytes of ``count`` images decoded in ``mode`` at the stored ``geometry`` (uint8)."""
    height, width = geometry["size"]
    return count * MODE_CHANNELS[mode] * height * width


def budget_bytes(cache_memory: float | None) -> int:
    """The memory decoded splits may take: ``cache_memory`` GiB, else half of what is free."""
    if cache_memory is not None:
        if cache_memory < 0:
            raise CnnkitError(f"data.cache_memory is in GiB and must be >= 0, got {cache_memory}")
        return int(cache_memory * 2**30)
    return int(available_memory() * DEFAULT_BUDGET_FRACTION)


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable on Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**30


def cache_key(
    paths: list, mode: str, geometry: dict, stats: list[tuple[int, int]] | None = None
) -> str:
    """Hash of every file's (path, size, mtime), the mode and the stored geometry. ``stats``:
    (size, mtime_ns) per file as listed; taken with ``os.stat`` when not given."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, mode, geometry], sort_keys=True).encode())
    if stats is None:
        stats = [file_stat(path) for path in paths]
    for path, (size, mtime) in zip(paths, stats, strict=True):
        h.update(f"{os.fspath(path)}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:32]


def decoded_images(
    paths: list,
    mode: str,
    geometry: dict,
    cache_dir: str | Path | None,
    *,
    workers: int,
    note: Callable[[str], None] = stderr_note,
) -> torch.Tensor:
    """uint8 (N, C, H, W) of ``paths`` decoded in ``mode`` and cut to ``geometry``; the first
    file that cannot be decoded raises its ``ImageFileError``. See ``decode_checked``."""
    images, failures = decode_checked(paths, None, mode, geometry, cache_dir, workers, note)
    if failures:
        raise ImageFileError(failures[0][1])
    return images


def decode_checked(
    paths: list,
    stats: list[tuple[int, int]] | None,
    mode: str,
    geometry: dict,
    cache_dir: str | Path | None,
    workers: int,
    note: Callable[[str], None] = stderr_note,
) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """(uint8 (N, C, H, W) of ``paths`` decoded in ``mode`` and cut to ``geometry``, failures).

    ``failures``: (index, message) of the files that could not be decoded, in index order; their
    rows are zeros. This pass decodes every file fully, so it doubles as the pre-flight check.
    Read from ``cache_dir/decoded/<key>.npy`` (failures from ``<key>.json``) when present; else
    decoded in ``workers`` processes and saved there (when ``cache_dir`` is None or not writable:
    kept in memory only).
    """
    shape = (len(paths), MODE_CHANNELS[mode], *geometry["size"])
    folder = Path(cache_dir).expanduser() / "decoded" if cache_dir is not None else None
    key = cache_key(paths, mode, geometry, stats)
    final = folder / f"{key}.npy" if folder is not None else None
    if final is not None and final.is_file():
        cached = _read(final, shape)
        if cached is not None:
            return torch.from_numpy(cached[0]), cached[1]
    start = time.perf_counter()
    note(f"decoding {len(paths)} images once into {folder or 'memory'} ({_gib(shape):.2f} GiB)")
    target = _writable_target(folder, key, shape, note)
    try:
        if target is None:
            array = np.empty(shape, dtype=np.uint8)
            failures = _decode_range(paths, mode, geometry, array, 0, len(paths))
        else:
            failures = _decode_parallel(paths, mode, geometry, target, shape, workers)
            # the failures first: a cache file is never without them
            atomic_write_bytes(_failures_file(final), json.dumps(failures).encode())
            os.replace(target, final)
            fsync_dir(final.parent)
            array, failures = _read(final, shape)
    finally:
        if target is not None and target.exists():
            target.unlink()
    note(f"decoded {len(paths)} images in {time.perf_counter() - start:.1f} s")
    return torch.from_numpy(array), [(int(i), str(m)) for i, m in failures]


def _failures_file(array_file: Path) -> Path:
    return array_file.with_suffix(".json")


def _read(path: Path, shape: tuple) -> tuple[np.ndarray, list] | None:
    """The cached array fully in memory and its failures, or None when the file is unreadable or
    of another shape (then it is rebuilt)."""
    try:
        failures = json.loads(_failures_file(path).read_text())
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.shape != shape or array.dtype != np.uint8:
            return None
        # one sequential read; the training loop then never page-faults
        return np.array(array), [(int(i), str(m)) for i, m in failures]
    except (OSError, ValueError, TypeError):
        return None


def _writable_target(folder: Path | None, key: str, shape: tuple, note) -> Path | None:
    """A temporary .npy in ``folder`` for the workers to fill, or None (decode in memory)."""
    if folder is None:
        return None
    need = int(np.prod(shape)) + 2**20
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(folder).free < 2 * need:
            note(f"note: not enough free disk in {folder} to keep the decoded images; memory only")
            return None
        target = folder / f"{key}.tmp-{os.getpid()}.npy"
        np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=shape).flush()
        return target
    except OSError as e:
        note(f"note: cannot write the decode cache in {folder} ({e.strerror}); memory only")
        return None


def _decode_parallel(paths, mode, geometry, target: Path, shape: tuple, workers: int) -> list:
    chunks = [(i, min(i + CHUNK, len(paths))) for i in range(0, len(paths), CHUNK)]
    if workers <= 1 or len(chunks) == 1:
        array = np.load(target, mmap_mode="r+")
        failures = _decode_range(paths, mode, geometry, array, 0, len(paths))
        array.flush()
        return failures
    method = "fork" if sys.platform == "linux" else "spawn"
    context = multiprocessing.get_context(method)
    failures = []
    with context.Pool(
        workers, initializer=_init_worker, initargs=(paths, mode, geometry, str(target))
    ) as pool:
        for found in pool.imap_unordered(_decode_chunk, chunks):
            failures += found
    return sorted(failures)


_WORKER: dict = {}


def _init_worker(paths, mode, geometry, target) -> None:
    torch.set_num_threads(1)
    _WORKER.update(paths=paths, mode=mode, geometry=geometry, target=target)


def _decode_chunk(bounds: tuple[int, int]) -> list:
    array = np.load(_WORKER["target"], mmap_mode="r+")
    failures = _decode_range(_WORKER["paths"], _WORKER["mode"], _WORKER["geometry"], array, *bounds)
    array.flush()
    return failures


def _decode_range(paths, mode: str, geometry: dict, out: np.ndarray, start: int, end: int) -> list:
    """Decode files [start, end) into ``out``; (index, message) of those that cannot be (their
    rows are zeroed)."""
    ops = geometry_ops(geometry)
    failures = []
    for i in range(start, end):
        try:
            image = load_image(paths[i], mode)
        except ImageFileError as e:
            out[i] = 0
            failures.append((i, str(e)))
            continue
        out[i] = to_geometry(image, geometry, ops)
    return failures


def to_geometry(image, geometry: dict, ops: v2.Compose | None = None) -> np.ndarray:
    """uint8 (C, H, W) pixels of a PIL image resized and cropped to ``geometry`` by ``ops``
    (``geometry_ops(geometry)``). An image already at the stored size skips them: resizing to
    its own size and cropping all of it change nothing, and the transforms cost ~90 us a call,
    a third of the decode of a 32x32 JPEG."""
    height, width = geometry["size"]
    resize = geometry["resize"]
    same = image.size == (width, height) and resize in (min(height, width), [height, width])
    pixels = np.asarray(image if same else (ops or geometry_ops(geometry))(image), dtype=np.uint8)
    return pixels.reshape(pixels.shape[0], pixels.shape[1], -1).transpose(2, 0, 1)


def _gib(shape: tuple) -> float:
    return float(np.prod(shape)) / 2**30
