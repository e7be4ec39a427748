"""Rebuild a trained network from what its model file records (``cnnkit.modelfile``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.models._registry import create_model


def rebuild(meta: dict, state: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
    """The architecture ``meta`` names, with the weights ``state``, in eval mode on the CPU and
    carrying ``meta`` as ``.meta``; ``path`` only names the file in errors."""
    model = create_model(
        meta["arch"],
        num_classes=len(meta["classes"]),
        in_chans=meta["in_chans"],
        **meta.get("kwargs", {}),
    )
    _check_shapes(model, state, meta, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CnnkitError(
            f"{path}: weights do not fit architecture {meta['arch']}: "
            f"{str(e).splitlines()[-1].strip()}"
        ) from None
    model.meta = meta
    return model.eval()


def _check_shapes(model: nn.Module, state: dict, meta: dict, path: str | Path) -> None:
    """A head whose size differs from the file's class list means the file was tampered with
    or mixed up; say so in those terms rather than as a tensor size mismatch."""
    expected = model.state_dict()
    bad = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    head = model.default_cfg["classifier"] + "."
    if bad and all(k.startswith(head) for k in bad):
        raise CnnkitError(
            f"{path}: the classifier has {state[bad[0]].shape[0]} outputs but the "
            f"file lists {len(meta['classes'])} classes; the file is inconsistent"
        )
