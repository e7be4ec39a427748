"""Model files of every format loaded as ``nn.Module``s that carry ``.meta``: ``load_model``.

``model.safetensors`` is read by ``cnnkit.modelfile`` and rebuilt by ``cnnkit.models.rebuild``.
Wrapping an ONNX Runtime session (or a TorchScript module) in a module with the same ``.meta``
(classes, preprocessing) as a ``.safetensors`` model lets ``predict``, ``eval``, ``serve`` and
``bench`` take any format through one code path: they only call ``model(x)`` on a float batch
(B, C, H, W) and read ``model.meta``.

Metadata lives in the file: ONNX ``metadata_props`` (the full JSON under ``cnnkit`` plus readable
``classes``/``mean``/``std``/``input_size``/``cnnkit_version`` keys) and a ``cnnkit.json`` extra
file inside a TorchScript archive.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit import models
from cnnkit.engine import runtime
from cnnkit.errors import CnnkitError
from cnnkit.modelfile import MODEL_FORMAT, load_model_file, model_path

ONNX_SUFFIX = ".onnx"
TORCHSCRIPT_SUFFIXES = (".pt", ".ts")  # exported as <name>.torchscript.pt
META_KEY = "cnnkit"
TORCHSCRIPT_META = "cnnkit.json"

EXTRAS = {  # module -> the pip extra that installs it
    "onnx": "export",
    "onnxruntime": "export",
    "fastapi": "serve",
    "uvicorn": "serve",
    "python_multipart": "serve",
    "optuna": "tune",
}


def require(module: str, purpose: str):
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module, "dev")
        raise CnnkitError(
            f"{purpose} needs the '{module}' package: pip install 'cnnkit[{extra}]'"
        ) from None


def load_model(
    run_or_model: str | Path, device: str = "cpu", model: nn.Module | None = None
) -> nn.Module:
    """Rebuild a trained model from its model file (or run folder), in eval mode.

    The returned module carries the file's metadata (classes, preprocessing, precision...) as
    ``model.meta``. Exported ``.onnx`` (ONNX Runtime, CPU) and TorchScript files load too, with
    the same ``.meta``. Your own model is rebuilt from the import path the file records;
    ``model``: a module you built instead (its weights are replaced by the file's), for one that
    path cannot rebuild.
    """
    path = model_path(run_or_model)
    if is_exported(path):  # .onnx / TorchScript: same .meta, same call, another runtime
        return load_exported(path)
    state, meta = load_model_file(path)
    model = models.rebuild(meta, state, path, model)
    return model.to(runtime.resolve_device(device))


def is_exported(path: str | Path) -> bool:
    """True for files this module loads (ONNX, TorchScript) rather than ``.safetensors``."""
    suffix = Path(path).suffix.lower()
    return suffix == ONNX_SUFFIX or suffix in TORCHSCRIPT_SUFFIXES


def load_exported(path: str | Path) -> nn.Module:
    """An ONNX or TorchScript file as an eval-mode module with ``.meta``."""
    path = Path(path)
    if not path.is_file():
        raise CnnkitError(f"model file not found: {path}")
    if path.suffix.lower() == ONNX_SUFFIX:
        return OnnxModel(path)
    return TorchScriptModel(path)


def onnx_metadata(meta: dict) -> dict[str, str]:
    """String key/values for an ONNX file's ``metadata_props``."""
    return {
        "format": MODEL_FORMAT,
        META_KEY: json.dumps(meta),
        "classes": json.dumps(meta["classes"]),
        "mean": json.dumps(meta["mean"]),
        "std": json.dumps(meta["std"]),
        "input_size": json.dumps(meta["input_size"]),
        "cnnkit_version": str(meta["cnnkit_version"]),
    }


def session_options(threads: int | None = None):
    """ORT options using as many threads as torch does, so comparisons are like for like."""
    ort = require("onnxruntime", "running an ONNX model")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers are noise to a user
    return options


def ort_session(path: str | Path, threads: int | None = None):
    """A CPU ONNX Runtime session for ``path``; errors name the file."""
    ort = require("onnxruntime", "running an ONNX model")
    try:
        return ort.InferenceSession(
            str(path), session_options(threads), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise CnnkitError(f"cannot load ONNX model {path}: {str(e).splitlines()[0]}") from None


class OnnxModel(nn.Module):
    """An ONNX Runtime CPU session behind ``forward``; outputs come back on the input's device."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = path
        self.session = ort_session(path, threads)
        props = self.session.get_modelmeta().custom_metadata_map
        if props.get("format") != MODEL_FORMAT or META_KEY not in props:
            raise CnnkitError(
                f"{path} is an ONNX file without cnnkit metadata; export it with `cnnkit export`"
            )
        self.meta = json.loads(props[META_KEY])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())  # ORT wants NCHW packed
        (logits,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(logits).to(x.device)


class TorchScriptModel(nn.Module):
    """A TorchScript archive written by ``cnnkit export --format torchscript``."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        extra = {TORCHSCRIPT_META: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # see export.write_torchscript
                self.module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as e:  # noqa: BLE001 - torch.jit raises several types
            raise CnnkitError(f"cannot load TorchScript model {path}: {e}") from None
        if not extra[TORCHSCRIPT_META]:
            raise CnnkitError(f"{path} has no cnnkit metadata; export it with `cnnkit export`")
        self.meta = json.loads(extra[TORCHSCRIPT_META])
        self.module.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)
