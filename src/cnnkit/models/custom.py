"""Bring your own model: ``pkg.module:name`` import paths, module instances, and the wrapper that
puts any ``nn.Module`` whose forward gives the logits behind the classifier contract.

A model file records the import path and kwargs (never a pickle), so loading it imports the
package and calls the builder again. Because a model file can come from anyone, an import path
may only name an ``nn.Module`` subclass or a function marked with ``@register_model``: loading a
file imports an installed module and builds a model with plain-value kwargs, but never calls an
arbitrary function (``os:system``) or runs code the file carries. When the current folder is
not on ``sys.path`` (the ``cnnkit`` console script), it is searched last, as uvicorn does for
``main:app``, so ``--model mynets:make_net`` finds ``./mynets.py``.

A wrapped module's classifier is its last ``Linear`` (else its last ``Conv2d``, a conv head), in
the order the module registers them, and its Grad-CAM layer is its last ``Conv2d``; the model must
end in that classifier for a class-count change (``reset_classifier``) to mean anything.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable

import torch
from torch import nn

from cnnkit.errors import CnnkitError

_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
CONTRACT = ("forward_features", "forward_head", "reset_classifier", "get_classifier")
CFG_KEYS = ("input_size", "mean", "std", "feature_layer", "classifier")


def is_import_path(name: str) -> bool:
    """``"pkg.module:factory"`` (checked after the ``tv:``/``timm:`` prefixes, which win)."""
    return bool(_IMPORT_PATH.fullmatch(name))


def import_path_of(obj: nn.Module | Callable) -> str:
    """``"module:QualName"`` of a module instance's class, or of a class or function."""
    target = obj if isinstance(obj, type) or not isinstance(obj, nn.Module) else type(obj)
    return f"{target.__module__}:{target.__qualname__}"


def resolve(path: str) -> Callable:
    """The object an import path names; ``CnnkitError`` naming the path when it cannot be had."""
    module_name, attr = path.split(":")
    module = _import(module_name, path)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = getattr(module, "__file__", None) or module_name
            raise CnnkitError(f"model '{path}': {module_name} has no '{attr}' (read {where})")
        obj = getattr(obj, part)
    return obj


def _import(module_name: str, path: str):
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # last, so a local file never shadows an installed package
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise CnnkitError(
            f"model '{path}' cannot be imported here ({e}); install the package that defines "
            "it or add its folder to PYTHONPATH"
        ) from None
    except Exception as e:  # the user's module failed while importing: show where with --debug
        raise CnnkitError(
            f"model '{path}': importing {module_name} raised {type(e).__name__}: {e}"
        ) from e


def check_builder(path: str, obj: object, registered: bool) -> None:
    """Refuse what a model file must not be able to make cnnkit call (see the module docstring)."""
    if registered or (isinstance(obj, type) and issubclass(obj, nn.Module)):
        return
    kind = "function" if inspect.isroutine(obj) else f"{type(obj).__name__} object"
    raise CnnkitError(
        f"model '{path}' is a {kind}, not an nn.Module class or a function marked with "
        "@cnnkit.register_model; mark it (a model file names only model builders, so loading "
        "one never calls an arbitrary function)"
    )


def call_builder(
    builder: Callable, num_classes: int, in_chans: int, kwargs: dict, name: str
) -> nn.Module:
    """``builder(**kwargs)``, given ``num_classes``/``in_chans`` when its signature takes them."""
    call = dict(kwargs)
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if _takes(builder, key):
            call[key] = value
    try:
        inspect.signature(builder).bind(**call)
    except TypeError as e:
        raise CnnkitError(f"model '{name}' cannot be built with kwargs {kwargs}: {e}") from None
    except ValueError:  # no signature to check (a builtin): let the call say what is wrong
        pass
    model = builder(**call)
    if not isinstance(model, nn.Module):
        raise CnnkitError(f"model '{name}' returned a {type(model).__name__}, not an nn.Module")
    return model


def _takes(fn: Callable, key: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except ValueError:
        return False
    return any(p.name == key or p.kind is p.VAR_KEYWORD for p in params)


def has_contract(model: nn.Module) -> bool:
    cfg = getattr(model, "default_cfg", None)
    methods = all(callable(getattr(model, m, None)) for m in CONTRACT)
    return methods and isinstance(cfg, dict) and all(k in cfg for k in CFG_KEYS)


def as_classifier(model: nn.Module, name: str, num_classes: int, in_chans: int) -> nn.Module:
    """``model`` with the classifier contract: itself when it has it, else wrapped, its head
    resized to ``num_classes`` when it has another size (in place: ``model`` changes too)."""
    if has_contract(model):
        model.default_cfg = {**model.default_cfg, "architecture": name}  # not a class-level dict
        if getattr(model, "num_classes", num_classes) != num_classes:
            model.reset_classifier(num_classes)
        return model
    _check_in_chans(model, name, in_chans)
    wrapped = WrappedClassifier(model, name, in_chans)
    if wrapped.num_classes != num_classes:
        wrapped.reset_classifier(num_classes)
    return wrapped


def _check_in_chans(model: nn.Module, name: str, in_chans: int) -> None:
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first[1].in_channels != in_chans:
        raise CnnkitError(
            f"model '{name}': its first conv ({first[0]}) takes {first[1].in_channels} channels "
            f"but the images have {in_chans}; give the builder an in_chans parameter"
        )


def last_module(model: nn.Module, kind: type | tuple[type, ...]) -> str | None:
    """Dotted name of the last submodule of ``kind`` in registration order (None if none)."""
    names = [n for n, m in model.named_modules() if isinstance(m, kind)]
    return names[-1] if names else None


class WrappedClassifier(nn.Module):
    """Any module whose forward gives the logits (``self.model``) behind the classifier contract.

    Its forward is the module's. ``forward_features`` is the output of the last conv (read with a
    hook); there is no separate head to run on it, so ``forward_head`` refuses. Mean and std are
    the neutral 0.5: a trained model file carries its data's own.
    """

    inner_prefix = "model."  # a state dict of the bare module loads too (load_state_into)

    def __init__(self, model: nn.Module, name: str, in_chans: int) -> None:
        super().__init__()
        self.model = model
        head = last_module(model, nn.Linear) or last_module(model, nn.Conv2d)
        if head is None:
            raise CnnkitError(f"model '{name}' has no Linear or Conv2d layer to classify with")
        self.head_name = head
        layer = model.get_submodule(head)
        self.num_classes = _outputs(layer)
        self._head_args = _head_args(layer)  # to make a fresh head even after an identity one
        conv = last_module(model, nn.Conv2d)
        self.default_cfg = {
            "architecture": name,
            "input_size": (in_chans, 224, 224),
            "mean": (0.5,) * in_chans,
            "std": (0.5,) * in_chans,
            "feature_layer": _join(conv) if conv is not None else None,
            "classifier": _join(head),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        name = self.default_cfg["feature_layer"]
        if name is None:
            raise CnnkitError(f"model '{self.default_cfg['architecture']}' has no conv layer")
        captured: list[torch.Tensor] = []
        hook = self.get_submodule(name).register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            self.model(x)
        finally:
            hook.remove()
        return captured[-1]  # (B, C, h, w) of the last conv

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise CnnkitError(
            f"model '{self.default_cfg['architecture']}' is a wrapped module: its forward gives "
            "the logits but it has no head to run on features alone; give it forward_features "
            "and forward_head (the classifier contract) to split it"
        )

    def get_classifier(self) -> nn.Module:
        return self.model.get_submodule(self.head_name)

    def reset_classifier(self, num_classes: int) -> None:
        new = _new_head(self._head_args, num_classes)
        if self.head_name == "":
            self.model = new
        else:
            self.model.set_submodule(self.head_name, new)
        self.num_classes = num_classes


def _join(name: str) -> str:
    return f"model.{name}" if name else "model"


def _outputs(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _head_args(layer: nn.Module) -> tuple:
    """What a fresh head needs: (in features, bias) for a Linear, plus the conv's geometry."""
    if isinstance(layer, nn.Linear):
        return (layer.in_features, layer.bias is not None)
    conv = (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    return (layer.in_channels, layer.bias is not None, *conv)


def _new_head(args: tuple, num_classes: int) -> nn.Module:
    """A fresh classifier layer with ``num_classes`` outputs (0: an identity, features only)."""
    if num_classes == 0:
        return nn.Identity()
    in_features, bias, *conv = args
    if not conv:
        return nn.Linear(in_features, num_classes, bias=bias)
    kernel, stride, padding, dilation = conv
    return nn.Conv2d(in_features, num_classes, kernel, stride, padding, dilation, bias=bias)
