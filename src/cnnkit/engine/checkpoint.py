"""Checkpoints (full training state) and the model file (weights + everything to use them).

- ``checkpoints/last.pt``: tensors, numbers, strings, lists and dicts only, loaded with
  ``weights_only=True`` so a checkpoint can never run code.
- ``model.safetensors``: the weights, with the architecture, class names and preprocessing as JSON
  in the safetensors metadata. Loading it never unpickles anything.

Every file is written atomically: to a temporary file in the same folder, fsynced, then moved over
the target with ``os.replace``, so a crash leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from cnnkit.errors import CnnkitError

MODEL_FORMAT = "cnnkit-model/1"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers only ever see the old or the new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomically save a training state made of tensors and plain values."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


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
