"""Checkpoints (full training state) and the model file (weights + everything to use them).

- ``checkpoints/last.pt``: tensors, numbers, strings, lists and dicts only, loaded with
  ``weights_only=True`` so a checkpoint can never run code.
- ``model.safetensors``: the weights, with the architecture, class names and preprocessing as JSON
  in the safetensors metadata. Loading it never unpickles anything.

Every file is written atomically: to a temporary file in the same folder, fsynced, then moved over
the target with ``os.replace`` and the folder fsynced, so a crash leaves either the old file or the
new one, never half; a failed write (disk full...) raises and leaves the old file and no temporary.
Weights that are not finite (NaN/inf) are never written. Each checkpoint save keeps the one before
as ``previous.pt``, so a damaged ``last.pt`` still leaves a good checkpoint to resume from.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_write_bytes, fsync_dir

MODEL_FORMAT = "cnnkit-model/1"


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


def check_finite(state_dict: dict, path: Path) -> None:
    """Raise instead of writing NaN/inf weights: such a file would poison every later use."""
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all():
            raise CnnkitError(f"refusing to write non-finite weights ({name}) to {path}")


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
    path = Path(path)
    if not path.is_file():
        raise CnnkitError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CnnkitError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


def save_model_file(path: str | Path, state_dict: dict, meta: dict) -> None:
    """Write weights + JSON metadata (architecture, classes, preprocessing...) as safetensors."""
    check_finite(state_dict, Path(path))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    metadata = {"format": MODEL_FORMAT, "cnnkit": json.dumps(meta)}  # key order matters (spec)
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))


def load_model_file(path: str | Path) -> tuple[dict, dict]:
    """Read a model file: (state_dict, metadata). Never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise CnnkitError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise CnnkitError(f"{path} is not a cnnkit model file ({e})") from None
    if metadata.get("format") != MODEL_FORMAT or "cnnkit" not in metadata:
        raise CnnkitError(
            f"{path} is a safetensors file without cnnkit metadata; "
            "use --weights to start training from plain weights"
        )
    return tensors, json.loads(metadata["cnnkit"])
