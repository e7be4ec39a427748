"""Your own model across a model file: the name to record for it, whether that name rebuilds it,
a dry run before training, and rebuilding it when the file is loaded.

A model file holds weights and a name with kwargs, never a pickle. For a factory or class given
by import path that is enough. For a module instance (``cnnkit.train(data, model=net)``) the file
records its class (or its zoo name) and ``model.kwargs``; when that does not rebuild the same
weights (a constructor with arguments cnnkit cannot know) the run says so once, and
``load_model(path, model=<a module like it>)`` loads the weights into a module the user builds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.models import custom
from cnnkit.models._registry import create_model
from cnnkit.models.summary import layer_table


def name_for(obj: nn.Module | Callable) -> str:
    """The model name to record for a module instance (its zoo name when ``create_model`` made
    it, else its class's import path), or for a class or builder function (its import path)."""
    if isinstance(obj, nn.Module) and custom.has_contract(obj):
        return obj.default_cfg.get("architecture") or custom.import_path_of(obj)
    return custom.import_path_of(obj)


def model_from_meta(meta: dict, source: str, module: nn.Module | None = None) -> nn.Module:
    """The untrained model a model file's metadata describes, ready for its weights: built from
    ``meta["arch"]`` and ``meta["kwargs"]``, or ``module`` put behind the contract as training
    did. ``source`` (the file) goes into errors."""
    num_classes, in_chans = len(meta["classes"]), meta["in_chans"]
    if module is not None:
        return custom.as_classifier(module, meta["arch"], num_classes, in_chans)
    kwargs = meta.get("kwargs", {})
    try:
        return create_model(meta["arch"], num_classes=num_classes, in_chans=in_chans, **kwargs)
    except CnnkitError as e:
        if not custom.is_import_path(meta["arch"]):
            raise
        raise CnnkitError(
            f"{source}: {e}; or, in Python, load its weights into a module you build: "
            "cnnkit.load_model(path, model=...)"
        ) from None


def rebuild_note(
    model: nn.Module, name: str, kwargs: dict, num_classes: int, in_chans: int
) -> str | None:
    """Why ``name`` with ``kwargs`` would not rebuild ``model`` (trained from an instance) when
    its model file is loaded, and what to do; None when it would."""
    why = _unrebuildable(model, name, kwargs, num_classes, in_chans)
    if why is None:
        return None
    return (
        f"the model file records '{name}' with kwargs {kwargs}, which will not rebuild this "
        f"module ({why}); load it with cnnkit.load_model(path, model=<a module like this one>)"
    )


def _unrebuildable(
    model: nn.Module, name: str, kwargs: dict, num_classes: int, in_chans: int
) -> str | None:
    if name.startswith("__main__:") or "<locals>" in name:
        return "its class is defined in a script or function that other processes cannot import"
    try:  # on the meta device: nothing is allocated and the seeded random stream is untouched
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            rebuilt = create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever fails here fails at load time too
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    if _shapes(rebuilt) != _shapes(model):
        return "it builds other layers; give its constructor arguments as model.kwargs"
    return None


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_logits(
    model: nn.Module, name: str, input_size: tuple[int, int, int], num_classes: int
) -> None:
    """One forward pass on a batch of 1 before training a model cnnkit did not write: raise
    ``CnnkitError`` naming the layer that fails (and the shape it got), or saying the logits are
    not (1, ``num_classes``)."""
    table = layer_table(model, input_size)
    if table.error is not None:
        raise CnnkitError(f"model '{name}' cannot run on {tuple(input_size)}: {table.error}")
    if table.output != (1, num_classes):
        raise CnnkitError(
            f"model '{name}' gives outputs of shape {table.output} for an input of shape "
            f"{(1, *input_size)}, not the logits (1, {num_classes}) of the data's {num_classes} "
            "classes; give it a num_classes parameter or end its forward in its last Linear"
        )


def rebuild(
    meta: dict, state: dict[str, torch.Tensor], path: str | Path, module: nn.Module | None = None
) -> nn.Module:
    """The model a model file describes (``model_from_meta``) with the file's weights ``state``,
    in eval mode on the CPU and carrying ``meta`` as ``.meta``; ``path`` names the file in
    errors."""
    model = model_from_meta(meta, str(path), module)
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
