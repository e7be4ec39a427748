"""Model registry: register, list, create; and the helpers every caller of a model needs.

A builder is a 3-5 line function behind ``@register_model(input_size=..., mean=..., std=...)``
returning a model class that honours the classifier contract (see ``layers.ClassifierModel``). Its
keyword options are its own defaulted parameters plus, when it forwards ``**kwargs``, the
defaulted parameters of the class it returns (its return annotation). Parameters without defaults
are the architecture the builder fixes, so they are not options.

``create_model`` also understands ``"spec"`` (a network from a layer list, ``spec.py``),
``"tv:<name>"`` (torchvision), ``"timm:<name>"`` (timm), see ``adapters.py``, and
``"pkg.module:name"`` (your own model class or registered builder, see ``custom.py``).

Users register their own builders the same way. An installed package can list the modules that
register them under the ``cnnkit.models`` entry-point group (``mynets = "mynets.zoo"``); they are
imported the first time the registry is listed or misses a name, so ``cnnkit models`` shows them.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import typing
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cnnkit.errors import CnnkitError
from cnnkit.models import adapters, custom, spec
from cnnkit.models.adapters import adapt_input_weight
from cnnkit.models.layers import fit_channels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

# Name prefixes handled by adapters instead of the registry.
_ADAPTERS: dict[str, Callable[..., nn.Module]] = {
    "tv:": adapters.create_torchvision,
    "timm:": adapters.create_timm,
}
# Name prefixes of segmentation heads on a backbone (``fpn:resnet18_slim``), see ``heads.py``.
_HEADS: dict[str, Callable[..., nn.Module]] = {}
_PREFIXES_TO_STRIP = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    input_size: tuple[int, int, int]  # (C, H, W) the model is designed for
    mean: tuple[float, ...]
    std: tuple[float, ...]
    task: str = "classification"  # what its outputs are: logits per image, or per pixel


_MODELS: dict[str, _Entry] = {}


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    input_size: tuple[int, int, int] = (3, 224, 224),
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    task: str = "classification",
):
    """Register a builder under its function name (bare ``@register_model`` or with a cfg).

    The builder returns an ``nn.Module``: one without the classifier contract is wrapped (see
    ``custom.py``). It gets ``num_classes`` and ``in_chans`` when its signature takes them.
    ``input_size`` (C, H, W), ``mean`` and ``std`` are what the model is designed for;
    ``task`` the task its outputs serve (``segmentation``: logits (B, K, H, W)).

    Raises ``CnnkitError`` when another builder has the name (the same function defined again,
    as a re-run notebook cell does, replaces itself).
    """

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name == "spec" or (name in _MODELS and not _same(_MODELS[name].builder, builder)):
            raise CnnkitError(f"a model named '{name}' is already registered; pick another name")
        _MODELS[name] = _Entry(builder, tuple(input_size), tuple(mean), tuple(std), task)
        return builder

    return wrap(fn) if fn is not None else wrap


def _same(a: Callable, b: Callable) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register_head(prefix: str):
    """Register a builder of a segmentation head on any backbone under a name ``prefix``
    (``"fpn:"``); it is called as ``builder(backbone_name, num_classes, in_chans, pretrained,
    **kwargs)``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if prefix in _HEADS and not _same(_HEADS[prefix], builder):
            raise CnnkitError(f"a head named '{prefix}' is already registered; pick another name")
        _HEADS[prefix] = builder
        return builder

    return wrap


def head_prefix(name: str) -> str | None:
    """The head prefix ``name`` starts with (``"fpn:"`` of ``fpn:resnet18_slim``), or None."""
    return next((p for p in _HEADS if name.startswith(p)), None)


_PLUGINS_LOADED = False


def _load_plugins() -> None:
    """Import the modules installed packages list under the ``cnnkit.models`` entry points."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True  # before importing: a plugin that lists models must not recurse
    for point in entry_points(group="cnnkit.models"):
        try:
            point.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not hide the zoo
            raise CnnkitError(
                f"model plugin '{point.name}' ({point.value}, entry point cnnkit.models) "
                f"failed to import: {type(e).__name__}: {e}"
            ) from e


def list_models(
    pattern: str | None = None, include_test: bool = False, task: str | None = None
) -> list[str]:
    """Sorted registry names matching the fnmatch ``pattern``; ``test_*`` ones only on request;
    ``task``: only the models of that task (None: all)."""
    _load_plugins()
    names = [n for n in sorted(_MODELS) if include_test or not n.startswith("test_")]
    names = [n for n in names if task is None or _MODELS[n].task == task]
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def model_task(name: str) -> str:
    """The task a registered model or head (``fpn:...``) serves; other names (spec, tv:, timm:,
    import paths) are classifiers."""
    if head_prefix(name) is not None:
        return "segmentation"
    entry = _MODELS.get(name)
    return entry.task if entry is not None else "classification"


def create_model(
    name: str,
    num_classes: int = 1000,
    in_chans: int = 3,
    pretrained: bool = False,
    **kwargs: typing.Any,
) -> nn.Module:
    """Build a model by name: a registry name, ``"spec"``, ``"tv:<name>"``, ``"timm:<name>"``,
    an import path ``"pkg.module:name"`` (an ``nn.Module`` class or a registered builder), or a
    segmentation head on any of those (``"fpn:<backbone>"``, ``"deeplab:<backbone>"``).

    ``kwargs`` go to the builder (e.g. ``drop_rate``, ``width_mult``, ``layers`` for ``spec``).
    ``pretrained`` downloads published weights, which exist only for ``tv:`` and ``timm:``.
    """
    if not isinstance(name, str):
        raise CnnkitError(f"model name must be a string like 'resnet18', got {name!r}")
    _check_sizes(num_classes, in_chans)
    head = head_prefix(name)
    if head is not None:
        return _HEADS[head](name[len(head) :], num_classes, in_chans, pretrained, **kwargs)
    for prefix, make in _ADAPTERS.items():
        if name.startswith(prefix):
            return make(name[len(prefix) :], num_classes, in_chans, pretrained, **kwargs)
    if pretrained:
        raise CnnkitError(
            f"model '{name}' has no published weights; use a torchvision or timm model "
            f"(e.g. tv:resnet18) with pretrained weights, or start from a file with --weights"
        )
    if name == "spec":
        model = spec.create_spec_model(num_classes=num_classes, in_chans=in_chans, **kwargs)
        model.default_cfg["architecture"] = "spec"
        return model
    if custom.is_import_path(name):
        return _create_from_path(name, num_classes, in_chans, kwargs)
    return _create_registered(name, _lookup(name), num_classes, in_chans, kwargs)


def _create_registered(
    name: str, entry: _Entry, num_classes: int, in_chans: int, kwargs: dict
) -> nn.Module:
    """``name`` is what the model's ``default_cfg["architecture"]`` (and a model file) says."""
    _check_kwargs(name, entry.builder, kwargs)
    model = custom.call_builder(entry.builder, num_classes, in_chans, kwargs, name)
    model = custom.as_classifier(model, name, num_classes, in_chans)
    model.default_cfg.update(
        input_size=(in_chans, *entry.input_size[1:]),
        mean=fit_channels(entry.mean, in_chans),
        std=fit_channels(entry.std, in_chans),
    )
    return model


def _create_from_path(name: str, num_classes: int, in_chans: int, kwargs: dict) -> nn.Module:
    builder = custom.resolve(name)
    entry = next((e for e in _MODELS.values() if e.builder is builder), None)
    if entry is not None:  # a registered builder keeps its input size, mean and std
        return _create_registered(name, entry, num_classes, in_chans, kwargs)
    custom.check_builder(name, builder, registered=False)
    model = custom.call_builder(builder, num_classes, in_chans, kwargs, name)
    return custom.as_classifier(model, name, num_classes, in_chans)


def _check_sizes(num_classes: int, in_chans: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise CnnkitError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise CnnkitError(
            f"in_chans must be an integer >= 1 (1 grayscale, 3 RGB), got {in_chans!r}"
        )


def _lookup(name: str) -> _Entry:
    if name not in _MODELS:
        _load_plugins()
    if name in _MODELS:
        return _MODELS[name]
    close = difflib.get_close_matches(name, [*_MODELS, "spec"], n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise CnnkitError(
        f"unknown model '{name}'.{hint} See `cnnkit models` for the list, or use "
        f"'spec', 'tv:<torchvision name>', 'timm:<timm name>' or 'pkg.module:YourNet'"
    )


def builder_options(builder: Callable[..., nn.Module]) -> list[str] | None:
    """Keyword options a builder accepts (besides ``num_classes`` and ``in_chans``); None when
    it takes ``**kwargs`` and has no return annotation to find them in (any may do)."""
    params = list(inspect.signature(builder).parameters.values())
    names = {p.name for p in params if p.default is not p.empty}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        cls = _return_type(builder)
        if cls is None:
            return None
        names |= {p.name for p in _defaulted(cls)}
    return sorted(names - {"num_classes", "in_chans"})


def _return_type(builder: Callable) -> type | None:
    try:
        cls = typing.get_type_hints(builder).get("return")
    except Exception:  # noqa: BLE001 - a user's annotation that does not resolve: no hint
        return None
    return cls if isinstance(cls, type) else None


def _defaulted(fn: Callable) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values() if p.default is not p.empty]


def _check_kwargs(name: str, builder: Callable[..., nn.Module], kwargs: dict) -> None:
    valid = builder_options(builder)
    unknown = [k for k in kwargs if valid is not None and k not in valid]
    if unknown:
        raise CnnkitError(
            f"model '{name}' has no option '{unknown[0]}'; valid options: {', '.join(valid)}"
        )


# --- helpers for callers: size, head, weights ------------------------------------------------


def model_info(model: nn.Module, input_size: tuple[int, int, int]) -> dict:
    """Parameter count and GFLOPs of one forward pass on a batch of 1 of ``input_size`` (C,H,W).

    FLOPs are counted by ``torch.utils.flop_counter`` (a multiply-add is 2 FLOPs, so the figure
    is twice the "GMACs" some papers quote). A model on the meta device is measured without
    computing anything.
    """
    params = sum(p.numel() for p in model.parameters())
    ref = next(model.parameters(), torch.empty(0))
    x = torch.zeros((1, *input_size), device=ref.device, dtype=ref.dtype)
    was_training = model.training
    model.eval()  # batch norm in train mode cannot run on a batch of 1 of a 1x1 map
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CnnkitError(f"model cannot run on input size {tuple(input_size)}: {first}") from None
    finally:
        model.train(was_training)
    return {"params": params, "gflops": counter.get_total_flops() / 1e9}


def summary_rows(include_test: bool = False) -> list[dict]:
    """One row per registered model: name, input_size, params, gflops at its default input size.

    Models are built on the meta device, so nothing is allocated or computed (the zoo takes
    well under a second).
    """
    rows = []
    for name in list_models(include_test=include_test):
        with torch.device("meta"):
            model = create_model(name)
        size = tuple(model.default_cfg["input_size"])
        rows.append({"name": name, "input_size": size, **model_info(model, size)})
    return rows


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the classifier head (what ``--freeze-epochs`` trains alone)."""
    return list(model.get_classifier().parameters())


def load_state_into(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state_dict`` into ``model``; return the head keys skipped.

    Keys may carry ``module.`` / ``_orig_mod.`` prefixes, and for an adapter (``tv:``/``timm:``)
    may be those of the wrapped model (its dropped auxiliary heads are ignored). RGB filters of
    the first conv are adapted when the model takes another channel count. Head tensors that are
    missing, unexpected or of another shape (a different class count) are skipped, leaving the
    head freshly initialised; any other mismatch raises ``CnnkitError`` naming the first keys
    and leaves the model untouched.
    """
    target = model.state_dict()
    source = _align_keys(_strip_prefixes(_check_tensors(state_dict)), target, model)
    source = _adapt_first_conv(source, target)
    keep, skipped, problems = _sort_keys(source, target, _head_prefix(model))
    if problems:
        more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
        raise CnnkitError(
            f"weights do not fit the model {_arch(model)}: {'; '.join(problems[:4])}{more}. "
            f"Check the architecture and its options match the ones the weights were trained with"
        )
    keep = OrderedDict(keep)
    keep._metadata = getattr(target, "_metadata", {})  # module versions (MNASNet checks its own)
    model.load_state_dict(keep, strict=False)
    return skipped


def _sort_keys(source: dict, target: dict, head: str | None) -> tuple[dict, list, list]:
    """Split ``source`` into tensors to load, head keys to skip, and problems to report."""

    def in_head(key: str) -> bool:
        return head is not None and key.startswith(head)

    keep, skipped, problems = {}, [], []
    for key, value in source.items():
        if key in target and target[key].shape == value.shape:
            keep[key] = value
        elif in_head(key):
            skipped.append(key)
        elif key in target:
            shapes = f"{tuple(value.shape)} in file, {tuple(target[key].shape)} in model"
            problems.append(f"shape of {key} ({shapes})")
        else:
            problems.append(f"unexpected {key}")
    # Batch norm fills in a missing step counter itself (older torchvision files lack it).
    missing = [k for k in target if k not in source and not k.endswith("num_batches_tracked")]
    skipped += [k for k in missing if in_head(k)]
    problems += [f"missing {k}" for k in missing if not in_head(k)]
    return keep, sorted(skipped), problems


def _check_tensors(state_dict: dict) -> dict:
    if not isinstance(state_dict, dict):
        raise CnnkitError(f"weights must be a dict of tensors, got {type(state_dict).__name__}")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CnnkitError(
                f"weights entry '{key}' is a {type(value).__name__}, not a tensor; pass the "
                f"model's state dict (e.g. checkpoint['model']), not a whole checkpoint"
            )
    return state_dict


def _strip_prefixes(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        while key.startswith(_PREFIXES_TO_STRIP):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _align_keys(source: dict, target: dict, model: nn.Module) -> dict:
    """Add or drop an adapter's inner prefix (``model.``) when that makes more keys match."""
    prefix = getattr(model, "inner_prefix", "")
    added = {prefix + k: v for k, v in source.items() if not k.startswith(prefix)}
    if prefix and len(added) == len(source):
        source = added if len(added.keys() & target) > len(source.keys() & target) else source
    ignored = getattr(model, "ignored_keys", ())
    return {k: v for k, v in source.items() if not (ignored and k.startswith(ignored))}


def _adapt_first_conv(source: dict, target: dict) -> dict:
    """The first 4-D weight, when it differs from the model's only in its input channels."""
    key = next((k for k, v in target.items() if v.ndim == 4), None)
    if key is None or key not in source:
        return source
    have, want = source[key].shape, target[key].shape
    if have == want or have[:1] + have[2:] != want[:1] + want[2:]:
        return source
    return {**source, key: adapt_input_weight(source[key], want[1])}


def _head_prefix(model: nn.Module) -> str | None:
    """Dotted name of the head module plus a dot, found by identity (None when no head)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in model.named_modules():
        if module is head:
            return f"{name}." if name else ""
    return None


def _arch(model: nn.Module) -> str:
    cfg = getattr(model, "default_cfg", {}) or {}
    return f"'{cfg.get('architecture', type(model).__name__)}'"
