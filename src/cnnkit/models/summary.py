"""Layer by layer: each layer's output shape, parameters, FLOPs and receptive field, from one
forward pass of a batch of 1, and the layer that fails with the shape it got.

This is how one debugs "mat1 and mat2 shapes cannot be multiplied (1x576 and 400x120)": the
table shows the map entering the flatten was 16x6x6, not the 16x5x5 the ``Linear(400, 120)``
was written for. Rows are the leaf modules in the order they ran (a module called twice gets two
rows, its parameters counted once). FLOPs are ``torch.utils.flop_counter``'s (a multiply-add is
2), per call; work done by functions in a parent's ``forward`` counts only in the total.

The receptive field is the side, in input pixels, of the window one output unit sees. It grows
through convs and pools (``rf += (kernel - 1) * dilation * jump``, ``jump *= stride``); a tensor
made outside a module (a residual sum) takes the largest field recorded for a map of its size,
which is the deeper branch. After flattening every unit sees the whole image: ``None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.utils import _pair
from torch.utils.flop_counter import FlopCounterMode

from cnnkit.config import read_yaml
from cnnkit.errors import CnnkitError
from cnnkit.models import spec
from cnnkit.models._registry import create_model

_WINDOWED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
_ADAPTIVE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass
class LayerRow:
    name: str  # dotted module name, e.g. "features.0.conv"
    layer: str  # short description, e.g. "Conv2d(3->32, k3 s1)"
    output: tuple[int, ...] | str  # output shape for a batch of 1 (a type name if not a tensor)
    params: int
    flops: int
    receptive_field: tuple[int, int] | None  # (h, w) input pixels; None: the whole image
    entry: str = ""  # the spec entry the module comes from, e.g. "layers[3] conv"


@dataclass
class LayerTable:
    input_size: tuple[int, int, int]  # (C, H, W)
    rows: list[LayerRow] = field(default_factory=list)
    params: int = 0  # the whole model's
    flops: int = 0  # the whole pass's (up to the failure)
    output: tuple[int, ...] | None = None  # the model's output shape
    error: str | None = None  # the failing layer, the shape it got and the error; None: it ran


def layer_table(
    model: nn.Module, input_size: tuple[int, int, int], labels: dict[str, str] | None = None
) -> LayerTable:
    """Run ``model`` (eval mode, no grad) on zeros of ``(1, *input_size)`` and describe each
    layer. A failure does not raise: the rows up to it are kept and ``error`` says which layer
    failed on what shape. ``labels`` maps module names to what the user wrote (spec entries)."""
    table = LayerTable(tuple(input_size), params=sum(p.numel() for p in model.parameters()))
    ref = next(model.parameters(), torch.empty(0))
    x = torch.zeros((1, *input_size), device=ref.device, dtype=ref.dtype)
    recorder = _Recorder(model, x, labels or {})
    was_training = model.training
    model.eval()  # batch norm in train mode cannot run on a batch of 1 of a 1x1 map
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            recorder.counter = counter
            out = model(x)
        table.output = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    except Exception as e:  # noqa: BLE001 - any failure of the user's model is the answer
        table.error = recorder.failure(e)
    finally:
        recorder.remove()
        model.train(was_training)
    table.rows, table.flops = recorder.rows, int(counter.get_total_flops())
    return table


class _Recorder:
    """Forward hooks on every module: rows for the leaves, the stack of modules running."""

    def __init__(self, model: nn.Module, x: torch.Tensor, labels: dict[str, str]) -> None:
        self.labels = labels
        self.rows: list[LayerRow] = []
        self.running: list[tuple[str, nn.Module, object]] = []  # (name, module, its input)
        self.counted: set[int] = set()  # leaves whose parameters are already in a row
        self.fields = {id(x): (tuple(x.shape), (1, 1), (1, 1))}  # id -> (shape, rf, jump)
        self.keep = [x]  # the tensors in fields stay alive, so their ids stay theirs
        self.counter: FlopCounterMode | None = None
        self.flops_before: list[int] = []
        self.handles = []
        for name, module in model.named_modules():
            leaf = next(module.children(), None) is None
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave(name, leaf)))

    def _enter(self, name: str):
        def hook(module, args):
            self.running.append((name, module, args[0] if args else None))
            self.flops_before.append(self._flops())

        return hook

    def _leave(self, name: str, leaf: bool):
        def hook(module, args, output):
            _, _, inp = self.running.pop()
            flops = self._flops() - self.flops_before.pop()
            if leaf:
                self.rows.append(self._row(name, module, inp, output, flops))

        return hook

    def _flops(self) -> int:
        return int(self.counter.get_total_flops()) if self.counter is not None else 0

    def _row(self, name: str, module: nn.Module, inp, output, flops: int) -> LayerRow:
        params = 0
        if id(module) not in self.counted:
            self.counted.add(id(module))
            params = sum(p.numel() for p in module.parameters())
        rf = self._grow(module, inp, output)
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        return LayerRow(name, describe(module), shape, params, flops, rf, self._label(name))

    def _grow(self, module: nn.Module, inp, output) -> tuple[int, int] | None:
        """The receptive field of ``output`` from that of ``inp``; recorded for later layers."""
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            return None
        rf, jump = self._field_of(inp)
        if isinstance(module, _WINDOWED + _ADAPTIVE) and isinstance(inp, torch.Tensor):
            kernel, stride, dilation = _window(module, inp, output)
            steps = zip(rf, kernel, dilation, jump, strict=True)
            rf = tuple(r + (k - 1) * d * j for r, k, d, j in steps)
            jump = tuple(j * s for j, s in zip(jump, stride, strict=True))
        self.fields[id(output)] = (tuple(output.shape), rf, jump)
        self.keep.append(output)
        return rf

    def _field_of(self, tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        if id(tensor) in self.fields:
            return self.fields[id(tensor)][1:]
        size = tuple(tensor.shape)[-2:] if isinstance(tensor, torch.Tensor) else None
        same = [f for f in self.fields.values() if f[0][-2:] == size]
        if not same:
            same = list(self.fields.values())[-1:]
        return max(same, key=lambda f: f[1])[1:]

    def _label(self, name: str) -> str:
        keys = [k for k in self.labels if name == k or name.startswith(k + ".")]
        return self.labels[max(keys, key=len)] if keys else ""

    def failure(self, error: Exception) -> str:
        """One line: the module that was running when ``error`` was raised, and its input."""
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if not self.running:
            return f"the model's forward failed: {first}"
        name, module, inp = self.running[-1]
        where = f"{self._label(name)} ({name or 'model'}: {describe(module)})".lstrip()
        if next(module.children(), None) is None or not self.rows:
            return f"{where} got {_shape(inp)}: {first}"
        last = self.rows[-1]
        return f"{where} failed after {last.name} gave {_shape(last.output)}: {first}"

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _window(module: nn.Module, inp: torch.Tensor, output: torch.Tensor):
    """(kernel, stride, dilation) pairs; an adaptive pool's are those of its widest window."""
    if isinstance(module, _ADAPTIVE):
        sizes = list(zip(inp.shape[-2:], output.shape[-2:], strict=True))
        kernel = tuple(math.ceil(i / o) for i, o in sizes)
        return kernel, tuple(max(i // o, 1) for i, o in sizes), (1, 1)
    dilation = getattr(module, "dilation", 1)  # AvgPool2d has none
    return _pair(module.kernel_size), _pair(module.stride), _pair(dilation)


def _shape(value) -> str:
    if isinstance(value, torch.Tensor):
        value = tuple(value.shape)
    return str(value) if isinstance(value, tuple) else type(value).__name__


def describe(module: nn.Module) -> str:
    """Short text for a row: the sizes that decide shapes, e.g. ``Linear(400->120)``."""
    kind = type(module).__name__
    if isinstance(module, nn.Conv2d):
        groups = f" g{module.groups}" if module.groups > 1 else ""
        sizes = f"k{_side(module.kernel_size)} s{_side(module.stride)}"
        return f"{kind}({module.in_channels}->{module.out_channels}, {sizes}{groups})"
    if isinstance(module, nn.Linear):
        return f"{kind}({module.in_features}->{module.out_features})"
    if isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
        return f"{kind}(k{_side(module.kernel_size)} s{_side(module.stride)})"
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        return f"{kind}({module.num_features})"
    return kind


def _side(value) -> str:
    h, w = _pair(value)
    return str(h) if h == w else f"{h}x{w}"


def model_for_layers(target: str, in_chans: int = 3) -> tuple[nn.Module, dict[str, str]]:
    """What ``cnnkit models TARGET --layers`` describes: a model name (registry, ``tv:``,
    ``timm:``, ``pkg.module:name``) or a YAML file holding a layer list, a mapping with
    ``layers``, or a config with a ``model`` section. Returns the model (built for 1000 classes,
    as ``cnnkit models`` counts them) and the spec entry of each module (empty for non-specs)."""
    name, kwargs = target, {}
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        name, kwargs = _model_in_yaml(Path(target))
    model = create_model(name, in_chans=in_chans, **kwargs)
    labels = spec.entry_labels(kwargs["layers"]) if name == "spec" else {}
    return model, labels


def _model_in_yaml(path: Path) -> tuple[str, dict]:
    raw = read_yaml(path)
    if isinstance(raw, list) or (isinstance(raw, dict) and "layers" in raw):
        return "spec", {"layers": raw if isinstance(raw, list) else raw["layers"]}
    section = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise CnnkitError(
            f"{path}: expected a layer list, a mapping with 'layers', or a config with a "
            "'model' section"
        )
    name = section.get("name", "auto")
    if name == "auto":  # chosen from the data at train time (models/auto.py), not from a file
        raise CnnkitError(
            f"{path}: model 'auto' picks its network from the data when training starts; "
            "name a model here (cnnkit models lists them), or train once and use the name its "
            "config.yaml records"
        )
    return name, dict(section.get("kwargs") or {})
