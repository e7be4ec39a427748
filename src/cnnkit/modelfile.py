"""The model file: ``model.safetensors`` with the weights, and as JSON in its safetensors metadata
everything needed to use them without the training data or config (task, architecture and
kwargs, classes, input size, mean/std, preprocessing, the run's precision, cnnkit version).

Reading it never unpickles anything; writing it is atomic (``cnnkit.fileio``) and refuses weights
that are not finite. Plain state dicts given as ``--weights`` (a safetensors file without our
metadata, or a torch ``.pt``/``.pth`` file) are read with ``weights_only=True``.

This module only reads and writes files; rebuilding the network is ``cnnkit.models.rebuild`` and
loading any format (also ONNX and TorchScript exports) as a module is
``cnnkit.deploy.formats.load_model``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_write_bytes

MODEL_FILE = "model.safetensors"
MODEL_FORMAT = "cnnkit-model/1"


def check_finite(state_dict: dict, path: Path) -> None:
    """Raise instead of writing NaN/inf weights: such a file would poison every later use."""
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all():
            raise CnnkitError(f"refusing to write non-finite weights ({name}) to {path}")


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


def load_torch_file(path: str | Path, what: str = "checkpoint") -> dict:
    """``torch.load`` with ``weights_only=True`` (tensors and plain values only, never code);
    errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CnnkitError(f"no {what} at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CnnkitError(f"cannot read {what} {path}: {str(e).splitlines()[0]}") from None


def read_weights(path: str | Path) -> dict:
    """A state dict from a cnnkit model file, a plain safetensors file or a torch .pt/.pth file."""
    path = Path(path)
    if not path.is_file():
        raise CnnkitError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise CnnkitError(f"cannot read weights {path}: {e}") from None
    state = load_torch_file(path, "weights file")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CnnkitError(f"{path} does not hold a state dict of tensors")
    return state


def model_path(run_or_model: str | Path) -> Path:
    """Accept a run folder or a model file; return the model file's path."""
    path = Path(run_or_model)
    if path.is_dir():
        path = path / MODEL_FILE
        if not path.is_file():
            raise CnnkitError(
                f"no {MODEL_FILE} in run folder {run_or_model}: did its training finish an epoch?"
            )
    elif not path.exists():
        raise CnnkitError(f"model file or run folder not found: {run_or_model}")
    return path


def run_folder_of(run_or_model: str | Path) -> Path:
    """The run folder a model file (model.safetensors, model.onnx...) lies in, or the folder."""
    path = Path(run_or_model)
    return path.parent if path.is_file() else path
