"""Data: sources (built-ins, folders, CSV) -> Splits, transforms, and exactly resumable loaders.

``build(cfg.data, seed)`` returns ``Splits`` whose datasets yield (x float32 (C, H, W), y int);
``make_loader`` turns one into a DataLoader whose epoch ``e`` depends only on (seed, e).

The names below are imported on first use, so ``cnnkit.data.doctor`` and ``cnnkit.data.images``
load without torch (``cnnkit doctor`` starts in a fraction of a second, not ~3 s).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "IMAGE_EXTENSIONS": "cnnkit.data.images",
    "ImageFileError": "cnnkit.data.images",
    "list_images": "cnnkit.data.images",
    "load_image": "cnnkit.data.images",
    "EpochSampler": "cnnkit.data.loader",
    "make_loader": "cnnkit.data.loader",
    "Augment": "cnnkit.data.augment",
    "BUILTINS": "cnnkit.data.sources",
    "Splits": "cnnkit.data.sources",
    "build": "cnnkit.data.sources",
    "build_eval": "cnnkit.data.sources",
    "batch_mix": "cnnkit.data.transforms",
    "eval_transform": "cnnkit.data.transforms",
    "image_mode": "cnnkit.data.transforms",
    "train_transform": "cnnkit.data.transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'cnnkit.data' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
