"""Decode once: image files -> one uint8 array at the stored resolution, persisted and reused.

Decoding a 32x32 JPEG costs ~0.12 ms of a core; doing it every epoch costs more than the forward
pass of a small network. When a split fits the memory budget, every file is decoded once, in
parallel processes, through the same ``load_image`` + resize/crop as the per-sample path, into a
(N, C, H, W) uint8 ``.npy`` file under ``<cache_dir>/decoded/``. Its name is a hash of the files
(path, size, mtime), the image mode and the stored geometry, so an unchanged dataset is read back
in a second and a changed file (or another input size) builds a new one. Files are written to a
temporary name and renamed, so a killed run never leaves a half-written cache behind.

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

from cnnkit.data.images import load_image
from cnnkit.data.transforms import INTERPOLATIONS
from cnnkit.engine.checkpoint import _fsync_dir as fsync_dir  # same durability as run files
from cnnkit.errors import CnnkitError

CACHE_VERSION = 1
CHUNK = 256  # images per task of a decode worker
DEFAULT_BUDGET_FRACTION = 0.5  # of the memory available when a split is loaded
MODES = ("auto", "on", "off")


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


DEFAULT_ROOT = "~/.cache/cnnkit"


def cache_root(configured: str | Path) -> Path:
    """The cache folder: ``data.cache_dir``, where ``$CNNKIT_CACHE_DIR`` replaces the default
    (the same variable the doctor's cache follows)."""
    if str(configured) == DEFAULT_ROOT and os.environ.get("CNNKIT_CACHE_DIR"):
        return Path(os.environ["CNNKIT_CACHE_DIR"]).expanduser()
    return Path(configured).expanduser()


def stderr_note(message: str) -> None:
    """Default for notes: standard error, so ``--json`` output on stdout stays clean."""
    print(message, file=sys.stderr)


def budget_bytes(cache_memory: float | None) -> int:
    """The memory a decoded split may take: ``cache_memory`` GiB, else half of what is free."""
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


def cache_key(paths: list[Path], mode: str, geometry: dict) -> str:
    """Hash of every file's (path, size, mtime), the mode and the stored geometry."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, mode, geometry], sort_keys=True).encode())
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            raise CnnkitError(f"cannot read {path}: {e.strerror}") from None
        h.update(f"{os.fspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def decoded_images(
    paths: list[Path],
    mode: str,
    geometry: dict,
    cache_dir: str | Path | None,
    *,
    workers: int,
    note: Callable[[str], None] = stderr_note,
) -> torch.Tensor:
    """uint8 (N, C, H, W) of ``paths`` decoded in ``mode`` and cut to ``geometry``.

    Read from ``cache_dir/decoded/<key>.npy`` when present; else decoded in ``workers``
    processes and saved there (when ``cache_dir`` is None or not writable: kept in memory only).
    """
    channels = 1 if mode == "L" else 3
    shape = (len(paths), channels, *geometry["size"])
    folder = Path(cache_dir).expanduser() / "decoded" if cache_dir is not None else None
    key = cache_key(paths, mode, geometry)
    final = folder / f"{key}.npy" if folder is not None else None
    if final is not None and final.is_file():
        array = _read(final, shape)
        if array is not None:
            return torch.from_numpy(array)
    start = time.perf_counter()
    note(f"decoding {len(paths)} images once into {folder or 'memory'} ({_gib(shape):.2f} GiB)")
    target = _writable_target(folder, key, shape, note)
    try:
        if target is None:
            array = np.empty(shape, dtype=np.uint8)
            _decode_range(paths, mode, geometry, array, 0, len(paths))
        else:
            _decode_parallel(paths, mode, geometry, target, shape, workers)
            os.replace(target, final)
            fsync_dir(final.parent)
            array = _read(final, shape)
    finally:
        if target is not None and target.exists():
            target.unlink()
    note(f"decoded {len(paths)} images in {time.perf_counter() - start:.1f} s")
    return torch.from_numpy(array)


def _read(path: Path, shape: tuple) -> np.ndarray | None:
    """The cached array fully in memory, or None when the file is unreadable or of another shape
    (then it is rebuilt)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.shape != shape or array.dtype != np.uint8:
            return None
        return np.array(array)  # one sequential read; the training loop then never page-faults
    except (OSError, ValueError):
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


def _decode_parallel(paths, mode, geometry, target: Path, shape: tuple, workers: int) -> None:
    chunks = [(i, min(i + CHUNK, len(paths))) for i in range(0, len(paths), CHUNK)]
    if workers <= 1 or len(chunks) == 1:
        array = np.load(target, mmap_mode="r+")
        _decode_range(paths, mode, geometry, array, 0, len(paths))
        array.flush()
        return
    method = "fork" if sys.platform == "linux" else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(
        workers, initializer=_init_worker, initargs=(paths, mode, geometry, str(target))
    ) as pool:
        for _ in pool.imap_unordered(_decode_chunk, chunks):
            pass


_WORKER: dict = {}


def _init_worker(paths, mode, geometry, target) -> None:
    torch.set_num_threads(1)
    _WORKER.update(paths=paths, mode=mode, geometry=geometry, target=target)


def _decode_chunk(bounds: tuple[int, int]) -> int:
    array = np.load(_WORKER["target"], mmap_mode="r+")
    _decode_range(_WORKER["paths"], _WORKER["mode"], _WORKER["geometry"], array, *bounds)
    array.flush()
    return bounds[1] - bounds[0]


def _decode_range(paths, mode: str, geometry: dict, out: np.ndarray, start: int, end: int) -> None:
    ops = geometry_ops(geometry)
    for i in range(start, end):
        pixels = np.asarray(ops(load_image(paths[i], mode)), dtype=np.uint8)
        out[i] = pixels.reshape(pixels.shape[0], pixels.shape[1], -1).transpose(2, 0, 1)


def _gib(shape: tuple) -> float:
    return float(np.prod(shape)) / 2**30
