"""Build a CNN from a list of layer entries (plain dicts, so a YAML file or string can hold it).

Each entry is a mapping whose FIRST key names its kind and holds the main value; the other keys
are options::

    - {conv: 32, kernel: 3, stride: 1, padding: 1, groups: 1, dilation: 1, bias: false}
    - {bn: true}                        # BatchNorm2d (BatchNorm1d after flatten)
    - {act: relu}                       # relu, relu6, silu, gelu, leaky_relu, ... (layers.py)
    - {pool: max, kernel: 2, stride: 2} # max | avg; stride defaults to kernel
    - {dropout: 0.25}
    - {flatten: true, pool: avg, size: 1}
    - {linear: 128}
    - {act: relu}

Defaults: a conv keeps the spatial size at stride 1 (``padding: null``) and has a bias only when
no ``bn`` follows it; ``{conv: 32, bn: true, act: relu}`` is a shorthand for the three entries.
``flatten`` first pools adaptively to ``size`` x ``size`` (default 1: global average pooling),
so one spec works at any input size. Everything before ``flatten`` is the feature extractor,
everything after it (linear/bn/act/dropout) the head, and a final linear layer to ``num_classes``
is always appended. Without a ``flatten`` entry the head is global average pooling + that linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.models.layers import (
    ACTIVATIONS,
    POOLS,
    ClassifierHead,
    ClassifierModel,
    ConvBNAct,
    base_cfg,
    init_weights,
    make_act,
)

# Kind -> (type of its main value, {option: type}). ``float`` also accepts integers.
_KINDS: dict[str, tuple[type, dict[str, type]]] = {
    "conv": (
        int,
        {
            "kernel": int,
            "stride": int,
            "padding": int,
            "groups": int,
            "dilation": int,
            "bias": bool,
            "bn": bool,
            "act": str,
        },
    ),
    "bn": (bool, {}),
    "act": (str, {}),
    "pool": (str, {"kernel": int, "stride": int, "padding": int}),
    "dropout": (float, {}),
    "flatten": (bool, {"pool": str, "size": int}),
    "linear": (int, {"bias": bool}),
}
_FEATURE_ONLY = {"conv", "pool"}  # kinds that need a (B, C, H, W) map
_HEAD_ONLY = {"linear"}  # kinds that need flat (B, F) features
_SPATIAL_POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
_MINIMUM = {"kernel": 1, "stride": 1, "groups": 1, "dilation": 1, "size": 1, "padding": 0}


@dataclass
class _Entry:
    index: int
    kind: str
    value: Any
    options: dict


class SpecNet(ClassifierModel):
    """A network built from a layer list (see the module docstring for the format)."""

    def __init__(
        self, layers: list[dict] | str, *, num_classes: int = 1000, in_chans: int = 3
    ) -> None:
        super().__init__()
        entries = parse_layers(layers)
        split = next((e.index for e in entries if e.kind == "flatten"), len(entries))
        features, chs, last_feature = _build_features(entries[:split], in_chans)
        self.features = nn.Sequential(*features)
        self.head = _build_head(entries[split:], chs, num_classes)
        self.num_classes = num_classes
        layer = f"features.{last_feature}" if last_feature is not None else "features"
        self.default_cfg = base_cfg(in_chans, layer, (32, 32))
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def create_spec_model(
    num_classes: int = 1000, in_chans: int = 3, layers: list[dict] | str | None = None, **kwargs
) -> SpecNet:
    """``create_model("spec", layers=[...])``: ``layers`` is a list of entries or a YAML string."""
    if kwargs:
        raise CnnkitError(f"model 'spec' has no option '{next(iter(kwargs))}'; valid: layers")
    if layers is None:
        raise CnnkitError(
            "model 'spec' needs layers, e.g. layers=[{conv: 32, bn: true, act: relu}, "
            "{pool: max, kernel: 2}, {flatten: true}]"
        )
    return SpecNet(layers, num_classes=num_classes, in_chans=in_chans)


def entry_labels(layers: list[dict] | str) -> dict[str, str]:
    """Module name -> the entry it was built from (``"features.2": "layers[2] pool"``), so a
    layer table or an error can speak in the user's terms."""
    entries = parse_layers(layers)
    split = next((e.index for e in entries if e.kind == "flatten"), len(entries))
    labels = {f"features.{e.index}": f"layers[{e.index}] {e.kind}" for e in entries[:split]}
    flat = f"layers[{split}] flatten" if split < len(entries) else "global pool (added)"
    labels.update({"head.pool": flat, "head.flatten": flat, "head.fc": "final linear (added)"})
    for j, e in enumerate(entries[split + 1 :]):
        labels[f"head.hidden.{j}"] = f"layers[{e.index}] {e.kind}"
    return labels


def parse_layers(layers: list[dict] | str) -> list[_Entry]:
    """Check every entry's kind, value and options; raise ``CnnkitError`` naming the entry."""
    if isinstance(layers, str):
        try:
            layers = yaml.safe_load(layers)
        except yaml.YAMLError as e:
            raise CnnkitError(f"spec layers are not valid YAML: {e}") from None
    if not isinstance(layers, list) or not layers:
        raise CnnkitError(f"spec layers must be a non-empty list of entries, got {layers!r}")
    return [_parse_entry(i, raw) for i, raw in enumerate(layers)]


def _parse_entry(index: int, raw: Any) -> _Entry:
    where = f"spec layers[{index}]"
    if not isinstance(raw, dict) or not raw:
        raise CnnkitError(f"{where} must be a mapping like {{conv: 32}}, got {raw!r}")
    kind, value = next(iter(raw.items()))
    if kind not in _KINDS:
        raise CnnkitError(
            f"{where}: first key '{kind}' is not a layer kind; kinds: {', '.join(_KINDS)}"
        )
    value_type, allowed = _KINDS[kind]
    _check_type(f"{where} {kind}", value, value_type)
    options = {k: v for k, v in raw.items() if k != kind}
    for key, val in options.items():
        if key not in allowed:
            valid = ", ".join(allowed) or "none"
            raise CnnkitError(f"{where}: unknown key '{key}' for {kind}; valid options: {valid}")
        if not (key == "padding" and val is None):
            _check_type(f"{where} {kind}.{key}", val, allowed[key])
    _check_value(where, kind, value, options)
    return _Entry(index, kind, value, options)


def _check_type(where: str, value: Any, expected: type) -> None:
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        raise CnnkitError(f"{where} must be {expected.__name__}, got {value!r}")


def _check_value(where: str, kind: str, value: Any, options: dict) -> None:
    names = {"act": ACTIVATIONS, "pool": _SPATIAL_POOLS}
    if kind in names and value not in names[kind]:
        raise CnnkitError(f"{where}: unknown {kind} '{value}'; choose: {', '.join(names[kind])}")
    if kind == "conv" and "act" in options and options["act"] not in ACTIVATIONS:
        raise CnnkitError(
            f"{where}: unknown act '{options['act']}'; choose: {', '.join(ACTIVATIONS)}"
        )
    if kind == "flatten" and value is not True:
        raise CnnkitError(
            f"{where}: write {{flatten: true}} (got {value!r}); omit it for no flatten"
        )
    if kind == "flatten" and options.get("pool", "avg") not in POOLS:
        raise CnnkitError(f"{where}: flatten pool must be one of {', '.join(POOLS)}")
    if kind in ("conv", "linear") and value < 1:
        raise CnnkitError(f"{where}: {kind} needs a positive size, got {value}")
    if kind == "dropout" and not 0 <= value < 1:
        raise CnnkitError(f"{where}: dropout must be in [0, 1), got {value}")
    for key, val in options.items():
        if key in _MINIMUM and val is not None and val < _MINIMUM[key]:
            raise CnnkitError(f"{where}: {kind}.{key} must be >= {_MINIMUM[key]}, got {val}")


def _build_features(entries: list[_Entry], in_chans: int) -> tuple[list, int, int | None]:
    """Modules before ``flatten``, the channels they output, and the index of the last layer
    of the last conv block (conv plus the bn/act right after it) for Grad-CAM."""
    modules, chs, last = [], in_chans, None
    for i, entry in enumerate(entries):
        if entry.kind in _HEAD_ONLY:
            raise CnnkitError(
                f"spec layers[{entry.index}]: {entry.kind} needs flat features (B, F) but gets "
                f"a (B, {chs}, H, W) map; put {{flatten: true}} before it"
            )
        next_kind = entries[i + 1].kind if i + 1 < len(entries) else None
        modules.append(_feature_module(entry, chs, next_kind))
        if entry.kind == "conv":
            chs, last = entry.value, len(modules) - 1
        elif entry.kind in ("bn", "act") and last == len(modules) - 2:
            last = len(modules) - 1
    return modules, chs, last


def _feature_module(entry: _Entry, chs: int, next_kind: str | None) -> nn.Module:
    o = entry.options
    if entry.kind == "conv":
        if chs % o.get("groups", 1) or entry.value % o.get("groups", 1):
            raise CnnkitError(
                f"spec layers[{entry.index}]: groups={o['groups']} must divide both the input "
                f"({chs}) and output ({entry.value}) channels"
            )
        norm, act = o.get("bn", False), o.get("act")
        bias = o.get("bias", not norm and next_kind != "bn")
        args = (chs, entry.value, o.get("kernel", 3), o.get("stride", 1), o.get("padding"))
        more = (o.get("groups", 1), o.get("dilation", 1))
        if norm or act:  # the {conv, bn, act} shorthand
            return ConvBNAct(*args, *more, norm=norm, act=act, bias=bias)
        padding = o.get("dilation", 1) * (args[2] - 1) // 2 if args[4] is None else args[4]
        return nn.Conv2d(*args[:4], padding, *more, bias=bias)
    if entry.kind == "pool":
        kernel = o.get("kernel", 2)
        pool = _SPATIAL_POOLS[entry.value]
        return pool(kernel, o.get("stride", kernel), o.get("padding", 0), ceil_mode=True)
    return _common_module(entry, chs, nn.BatchNorm2d)


def _common_module(entry: _Entry, size: int, norm: type[nn.Module]) -> nn.Module:
    if entry.kind == "bn":
        return norm(size) if entry.value else nn.Identity()
    if entry.kind == "act":
        return make_act(entry.value)
    return nn.Dropout(entry.value)


def _build_head(entries: list[_Entry], chs: int, num_classes: int) -> ClassifierHead:
    """``flatten`` entry and what follows it -> a ClassifierHead ending in the final linear."""
    if not entries:
        return ClassifierHead(chs, num_classes)
    flat, rest = entries[0], entries[1:]
    size = flat.options.get("size", 1)
    features, modules = chs * size * size, []
    for entry in rest:
        if entry.kind in _FEATURE_ONLY or entry.kind == "flatten":
            raise CnnkitError(
                f"spec layers[{entry.index}]: {entry.kind} needs a (B, C, H, W) map but gets "
                f"flat features (B, {features}) after flatten (layers[{flat.index}]); move it "
                "before the flatten"
            )
        if entry.kind == "linear":
            modules.append(nn.Linear(features, entry.value, bias=entry.options.get("bias", True)))
            features = entry.value
        else:
            modules.append(_common_module(entry, features, nn.BatchNorm1d))
    pool = flat.options.get("pool", "avg")
    return ClassifierHead(
        chs, num_classes, pool, 0.0, size, hidden=nn.Sequential(*modules), hidden_features=features
    )
