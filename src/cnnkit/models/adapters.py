"""torchvision and timm models wrapped to the classifier contract: ``tv:<name>``, ``timm:<name>``.

A torchvision model is split into features and head by a table of families (``_FAMILIES``,
keyed by class name): the steps that make the feature map, the steps between it and the
classifier module, and the attribute of that classifier. A family not in the table (ViT) still
trains, predicts and fine-tunes through its ``fc`` / ``classifier`` / ``heads`` / ``head``
attribute, but has no feature map to give Grad-CAM. timm models already honour the contract, so
their wrapper only forwards and adds the ``default_cfg`` keys cnnkit uses.

``in_chans`` other than 3 replaces the first conv; pretrained RGB filters are summed for 1
channel and cycled (and rescaled) for more, so pretrained features stay usable.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import get_model_weights

from cnnkit.errors import CnnkitError
from cnnkit.models.layers import fit_channels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Step = str | Callable[[torch.Tensor], torch.Tensor]  # attribute of the model, or a function


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(x, 1)


def _global_avg(x: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x, 1)


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean((2, 3))


class _Family(NamedTuple):
    features: tuple[Step, ...]  # input -> (B, C, h, w) feature map
    pre_head: tuple[Step, ...]  # feature map -> what the classifier takes
    classifier: str  # attribute holding the classifier (a Linear, or a Sequential ending in one)
    feature_layer: str  # module whose output is the feature map (for Grad-CAM)


_RESNET = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_SHUFFLENET = ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")
_GOOGLENET = (
    "_transform_input", "conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a",
    "inception3b", "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d",
    "inception4e", "maxpool4", "inception5a", "inception5b",
)  # fmt: skip
_INCEPTION3 = (
    "_transform_input", "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
    "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
    "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
)  # fmt: skip

# torchvision class name -> how its forward() splits; each mirrors that class's forward().
_FAMILIES: dict[str, _Family] = {
    "ResNet": _Family(_RESNET, ("avgpool", _flatten), "fc", "layer4"),
    "RegNet": _Family(("stem", "trunk_output"), ("avgpool", _flatten), "fc", "trunk_output"),
    "ShuffleNetV2": _Family(_SHUFFLENET, (_spatial_mean,), "fc", "conv5"),
    "GoogLeNet": _Family(_GOOGLENET, ("avgpool", _flatten, "dropout"), "fc", "inception5b"),
    "Inception3": _Family(_INCEPTION3, ("avgpool", "dropout", _flatten), "fc", "Mixed_7c"),
    "VGG": _Family(("features",), ("avgpool", _flatten), "classifier", "features"),
    "AlexNet": _Family(("features",), ("avgpool", _flatten), "classifier", "features"),
    "MobileNetV2": _Family(("features",), (_global_avg, _flatten), "classifier", "features"),
    "MobileNetV3": _Family(("features",), ("avgpool", _flatten), "classifier", "features"),
    "EfficientNet": _Family(("features",), ("avgpool", _flatten), "classifier", "features"),
    "MNASNet": _Family(("layers",), (_spatial_mean,), "classifier", "layers"),
    "DenseNet": _Family(("features", F.relu), (_global_avg, _flatten), "classifier", "features"),
    "ConvNeXt": _Family(("features",), ("avgpool",), "classifier", "features"),
    "SqueezeNet": _Family(("features",), (), "classifier", "features"),
    "MaxVit": _Family(("stem", "blocks"), (), "classifier", "blocks"),
    "SwinTransformer": _Family(
        ("features", "norm", "permute"), ("avgpool", "flatten"), "head", "permute"
    ),
}
_HEAD_ATTRS = ("fc", "classifier", "heads", "head")  # where unlisted families keep their head


class TorchvisionClassifier(nn.Module):
    """A torchvision classification model (``self.model``) behind the classifier contract."""

    inner_prefix = "model."  # state dicts of the bare torchvision model load too
    ignored_keys = ("model.aux1.", "model.aux2.", "model.AuxLogits.")  # dropped aux heads

    def __init__(self, model: nn.Module, name: str, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.model = model
        self.family = _FAMILIES.get(type(model).__name__)
        head_attr = self.family.classifier if self.family else _find_head_attr(model, name)
        self.head_attr = head_attr
        self.final_name = _final_layer_name(getattr(model, head_attr), name)
        self.num_features = _in_features(self.get_classifier().get_submodule(self.final_name))
        self.num_classes = num_classes
        size, mean, std = _torchvision_preprocessing(name)
        feature_layer = f"model.{self.family.feature_layer}" if self.family else "model"
        self.default_cfg = {
            "architecture": f"tv:{name}",
            "input_size": (in_chans, size, size),
            "mean": fit_channels(mean, in_chans),
            "std": fit_channels(std, in_chans),
            "feature_layer": feature_layer,
            "classifier": f"model.{head_attr}",
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.family is None:
            raise CnnkitError(
                f"{self.default_cfg['architecture']} has no convolutional feature map to show "
                f"(not a CNN family cnnkit knows); use a CNN such as tv:resnet18"
            )
        return _run(self.model, self.family.features, x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = _run(self.model, self.family.pre_head, x) if self.family else x
        head = self.get_classifier()
        if not pre_logits:
            return _flatten(head(x))  # SqueezeNet's conv head ends (B, classes, 1, 1)
        # A Sequential head: run the layers before its final one (e.g. VGG's hidden 4096 layers).
        for name, module in head.named_children():
            if self.final_name == "" or name == self.final_name.split(".")[0]:
                break
            x = module(x)
        return _flatten(_global_avg(x)) if x.ndim == 4 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def get_classifier(self) -> nn.Module:
        return getattr(self.model, self.head_attr)

    def reset_classifier(self, num_classes: int) -> None:
        old = self.get_classifier().get_submodule(self.final_name)
        new = _new_final(old, self.num_features, num_classes)
        if self.final_name == "":
            setattr(self.model, self.head_attr, new)
        else:
            self.get_classifier().set_submodule(self.final_name, new)
        self.num_classes = num_classes


def _run(model: nn.Module, steps: tuple[Step, ...], x: torch.Tensor) -> torch.Tensor:
    for step in steps:
        fn = getattr(model, step) if isinstance(step, str) else step
        if isinstance(fn, nn.ModuleList):  # MaxViT's blocks
            for block in fn:
                x = block(x)
        else:
            x = fn(x)
    return x


def _find_head_attr(model: nn.Module, name: str) -> str:
    for attr in _HEAD_ATTRS:
        if isinstance(getattr(model, attr, None), nn.Module):
            return attr
    raise CnnkitError(f"tv:{name}: no classifier found (looked for {', '.join(_HEAD_ATTRS)})")


def _final_layer_name(head: nn.Module, name: str) -> str:
    """Dotted name, inside the head, of its last Linear (or 1x1 Conv2d: SqueezeNet)."""
    found = [n for n, m in head.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not found:
        raise CnnkitError(f"tv:{name}: its classifier has no Linear layer to resize")
    return found[-1]


def _in_features(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _new_final(old: nn.Module, in_features: int, num_classes: int) -> nn.Module:
    if num_classes == 0:
        return nn.Identity()
    if isinstance(old, nn.Conv2d):  # SqueezeNet classifies with a 1x1 conv
        return nn.Conv2d(in_features, num_classes, 1)
    return nn.Linear(in_features, num_classes)


def _torchvision_preprocessing(name: str) -> tuple[int, tuple, tuple]:
    """Crop size, mean and std of the model's default published weights (224 / ImageNet if none)."""
    try:
        transforms = get_model_weights(name).DEFAULT.transforms()
    except (ValueError, AttributeError, KeyError):
        return 224, IMAGENET_MEAN, IMAGENET_STD
    size = transforms.crop_size[0] if hasattr(transforms, "crop_size") else 224
    return size, tuple(transforms.mean), tuple(transforms.std)


def create_torchvision(
    name: str, num_classes: int, in_chans: int, pretrained: bool, **kwargs: Any
) -> TorchvisionClassifier:
    """``tv:<name>``: ``torchvision.models.get_model(name)`` adapted to the contract."""
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join('tv:' + c for c in close)}?" if close else ""
        raise CnnkitError(
            f"unknown torchvision model 'tv:{name}'.{hint} Classification models: "
            f"torchvision.models.list_models(module=torchvision.models)"
        )
    model = _build_torchvision(tvm, name, num_classes, pretrained, kwargs)
    _drop_aux_heads(model)
    if in_chans != 3:
        _adapt_first_conv(model, in_chans, name)
    wrapped = TorchvisionClassifier(model, name, num_classes, in_chans)
    if pretrained and num_classes != 1000:
        wrapped.reset_classifier(num_classes)  # ImageNet head out, fresh head for our classes
    return wrapped


def _build_torchvision(tvm, name: str, num_classes: int, pretrained: bool, kwargs: dict):
    if not pretrained:
        try:
            return tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        except TypeError as e:
            raise CnnkitError(f"tv:{name} does not take the options {kwargs}: {e}") from None
    weights = tvm.get_model_weights(name).DEFAULT
    try:
        return tvm.get_model(name, weights=weights, **kwargs)
    except TypeError as e:
        raise CnnkitError(f"tv:{name} does not take the options {kwargs}: {e}") from None
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad file a RuntimeError
        where = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise CnnkitError(
            f"could not get the pretrained weights of tv:{name} "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); download "
            f"{weights.url} to {where}, or start from a weights file with --weights"
        ) from None


def _drop_aux_heads(model: nn.Module) -> None:
    """GoogLeNet/Inception-v3 auxiliary classifiers return tuples in training; cnnkit uses the
    main head only."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for attr in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, attr):
                setattr(model, attr, None)


def _adapt_first_conv(model: nn.Module, in_chans: int, name: str) -> None:
    """Replace the first 3-channel conv with an ``in_chans`` one, keeping what its filters see."""
    first = next(
        (
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.in_channels == 3
        ),
        None,
    )
    if first is None:
        raise CnnkitError(f"tv:{name}: found no 3-channel input conv to adapt to {in_chans}")
    conv_name, conv = first
    new = nn.Conv2d(
        in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
    )  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(adapt_input_weight(conv.weight, in_chans))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    model.set_submodule(conv_name, new)
    if hasattr(model, "transform_input"):
        model.transform_input = False  # GoogLeNet/Inception re-normalise 3 RGB channels


def adapt_input_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(O, 3, k, k) filters -> (O, in_chans, k, k) with the same response to a gray image."""
    if in_chans == 1:
        return weight.sum(1, keepdim=True)
    repeats = math.ceil(in_chans / weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


# --- timm ----------------------------------------------------------------------------------


class TimmClassifier(nn.Module):
    """A timm model (``self.model``): it has the contract already; this adds cnnkit's cfg keys."""

    inner_prefix = "model."

    def __init__(self, model: nn.Module, name: str, in_chans: int) -> None:
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        info = getattr(model, "feature_info", None) or [{"module": ""}]
        size = tuple(cfg.get("input_size", (3, 224, 224)))[1:]
        self.default_cfg = {
            "architecture": f"timm:{name}",
            "input_size": (in_chans, *size),
            "mean": fit_channels(tuple(cfg.get("mean", IMAGENET_MEAN)), in_chans),
            "std": fit_channels(tuple(cfg.get("std", IMAGENET_STD)), in_chans),
            "feature_layer": _join("model", info[-1]["module"]),
            "classifier": _join("model", _module_name(model, model.get_classifier())),
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def reset_classifier(self, num_classes: int) -> None:
        self.model.reset_classifier(num_classes)
        self.num_classes = num_classes
        self.default_cfg["classifier"] = _join(
            "model", _module_name(self.model, self.model.get_classifier())
        )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if name else prefix


def _module_name(root: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in root.named_modules() if m is module), "")


def create_timm(
    name: str, num_classes: int, in_chans: int, pretrained: bool, **kwargs: Any
) -> TimmClassifier:
    """``timm:<name>``: ``timm.create_model`` (needs the optional ``timm`` package)."""
    model = timm_model(name, pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    return TimmClassifier(model, name, in_chans)


def timm_model(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained, **kwargs)`` with cnnkit's errors: timm missing, an
    unknown name (with close ones), options it does not take, weights it cannot fetch."""
    try:
        import timm  # optional: only timm: names need it
    except ImportError:
        raise CnnkitError(
            f"timm:{name} needs the timm package: pip install timm (or pip install 'cnnkit[timm]')"
        ) from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join('timm:' + c for c in close)}?" if close else ""
        raise CnnkitError(f"unknown timm model 'timm:{name}'.{hint} See timm.list_models()")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise CnnkitError(f"timm:{name} does not take the options {kwargs}: {e}") from None
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise CnnkitError(
            f"could not get the pretrained weights of timm:{name} "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); fetch them once online "
            f"(they are cached under ~/.cache/huggingface or the torch hub folder), "
            f"or start from a weights file with --weights"
        ) from None
