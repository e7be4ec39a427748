"""Data: sources (built-ins, folders, CSV, shards) -> Splits, augmentation, resumable loaders.

``build(cfg.data, seed)`` returns ``Splits`` whose datasets yield (x float32 (C, H, W), y int)
and whose ``augment`` is the run's one ``Augment`` spec; ``make_loader`` turns a split into a
DataLoader whose epoch ``e`` depends only on (seed, e).

Modules, lowest first: images (open and decode files), host (cores, cache folder), readers
(folder/CSV layouts), builtins, augment (the spec), transforms (eval + per-sample executor),
batchaug (batched executor), cache (decode once), datasets, shards, stats (size, mean/std),
splits (build -> Splits), loader and memory (the loaders), doctor (+ duplicates).

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
    "BUILTINS": "cnnkit.data.builtins",
    "Splits": "cnnkit.data.splits",
    "build": "cnnkit.data.splits",
    "build_eval": "cnnkit.data.splits",
    "peek": "cnnkit.data.splits",
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
