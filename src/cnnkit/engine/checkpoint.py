"""Checkpoints: the full training state, to continue a run exactly (the model file, weights plus
everything to use them, is ``cnnkit.modelfile``).

``checkpoints/last.pt`` holds tensors, numbers, strings, lists and dicts only, and is loaded with
``weights_only=True`` so a checkpoint can never run code.

Every file is written atomically: to a temporary file in the same folder, fsynced, then moved over
the target with ``os.replace`` and the folder fsynced, so a crash leaves either the old file or the
new one, never half; a failed write (disk full...) raises and leaves the old file and no temporary.
Weights that are not finite (NaN/inf) are never written. Each checkpoint save keeps the one before
as ``previous.pt``, so a damaged ``last.pt`` still leaves a good checkpoint to resume from.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import torch

from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_write_bytes, fsync_dir
from cnnkit.modelfile import check_finite, load_torch_file


def save_checkpoint(path: str | Path, state: dict, keep_previous: bool = False) -> None:
    """Atomically save a training state made of tensors and plain values; refuses non-finite
    weights. ``keep_previous``: the file being replaced stays as ``previous.pt`` beside it."""
    path = Path(path)
    check_finite(state.get("model", {}), path)
    if isinstance(state.get("ema"), dict):
        check_finite(state["ema"]["module"], path)
    buf = io.BytesIO()
    torch.save(state, buf)
    for name in (path.name, PREVIOUS):  # temporaries left by a save killed half-way
        for stale in path.parent.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    if keep_previous and path.is_file():
        _copy_atomic(path, path.with_name(PREVIOUS))
    atomic_write_bytes(path, buf.getvalue())


PREVIOUS = "previous.pt"


def _copy_atomic(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` (a hard link when the filesystem has them), atomically."""
    if dst.exists() and os.path.samefile(src, dst):
        # a save killed after linking: both names are one file already, and renaming a link
        # onto another link of the same file is a no-op that would leave the temporary behind
        return
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


def load_latest(folder: str | Path) -> tuple[dict, Path]:
    """The newest checkpoint in ``folder`` that loads: ``last.pt``, else ``previous.pt`` (with a
    note saying why). Raises when none does."""
    folder = Path(folder)
    tried = []
    for name in ("last.pt", PREVIOUS):
        path = folder / name
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path)
        except CnnkitError as e:
            tried.append(str(e))
            continue
        if tried:
            print(f"note: {tried[0]}; resuming from the newest good checkpoint {path} instead")
        return state, path
    if not tried:
        raise CnnkitError(f"no checkpoint in {folder} (expected last.pt or {PREVIOUS})")
    raise CnnkitError(f"no usable checkpoint in {folder}: {'; '.join(tried)}")


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True``; errors name the file."""
    return load_torch_file(path, "checkpoint")
