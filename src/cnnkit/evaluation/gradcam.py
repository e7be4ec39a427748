"""Grad-CAM and Grad-CAM++: which parts of the image the evidence for a class came from.

Both hook the module named by the classifier contract's ``default_cfg["feature_layer"]`` (the
last (B, C, h, w) feature map), take the gradient of the chosen class's logit with respect to
that map, weight the map's channels by it and keep the positive part:

    Grad-CAM    (Selvaraju et al. 2017): channel weight = spatial mean of the gradient
    Grad-CAM++  (Chattopadhay et al. 2018): a per-pixel weighting of the positive gradient that
                separates several instances of a class better

Maps are computed for a whole batch in one forward and one backward pass (images are independent
in eval mode, so the gradient of the summed scores is each image's own gradient), upsampled
to the input size and scaled to 0..1 per image. Channels-last inputs and autocast (bf16/fp16)
work: the map and its gradient are read in float32 whatever layout or precision made them.
Nothing of the model changes: no parameter gradients are accumulated, and its train/eval mode
is restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import CnnkitError

EPS = 1e-7


def _gradcam_weights(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.mean((2, 3))  # (B, C)


def _gradcam_pp_weights(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    # alpha = g^2 / (2 g^2 + sum(A) g^3), the closed form for an exponential score.
    g2, g3 = grad.pow(2), grad.pow(3)
    denom = 2 * g2 + act.sum((2, 3), keepdim=True) * g3
    alpha = torch.where(grad != 0, g2 / torch.where(denom != 0, denom, EPS), 0.0)
    return (alpha * grad.clamp(min=0)).sum((2, 3))  # (B, C)


METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gradcam": _gradcam_weights,
    "gradcam++": _gradcam_pp_weights,
}


@dataclass
class Cams:
    maps: torch.Tensor  # (B, H, W) float32 in 0..1, at the input's size
    targets: torch.Tensor  # (B,) class index each map explains
    probs: torch.Tensor  # (B, K) softmax of the logits


def feature_module(model: nn.Module) -> nn.Module:
    """The module whose output Grad-CAM explains, from ``default_cfg["feature_layer"]``."""
    cfg = getattr(model, "default_cfg", None) or {}
    name = cfg.get("feature_layer")
    if name is None:
        raise CnnkitError(
            f"{type(model).__name__} has no default_cfg['feature_layer'] to explain; "
            "use a cnnkit model (see `cnnkit models`) or a tv:/timm: CNN"
        )
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        raise CnnkitError(f"feature_layer '{name}' is not a module of the model") from None


def compute_cams(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    method: str = "gradcam",
    autocast: contextlib.AbstractContextManager | None = None,
) -> Cams:
    """Class activation maps of ``images`` (B, C, H, W) for ``targets`` (default: predicted).

    ``autocast``: a context to run the forward pass in (e.g. ``Runtime.autocast()``).
    """
    if method not in METHODS:
        raise CnnkitError(f"unknown CAM method '{method}'; choose from {', '.join(METHODS)}")
    act, grad, logits, targets = _activation_and_gradient(model, images, targets, autocast)
    weights = METHODS[method](act, grad)  # (B, C)
    cam = F.relu((weights[:, :, None, None] * act).sum(1))  # (B, h, w)
    cam = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
    return Cams(maps=_unit_range(cam[:, 0]), targets=targets, probs=logits.softmax(1))


def _activation_and_gradient(model, images, targets, autocast):
    """One forward and one backward pass: (feature map, its gradient, logits, targets), float32."""
    captured: list[torch.Tensor] = []
    handle = feature_module(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    model.eval()
    try:
        # Outside inference mode and with grad on, and with a fresh input that requires grad,
        # so there is a graph to the feature map even when the model's parameters are frozen.
        with torch.inference_mode(False), torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)
            with autocast or contextlib.nullcontext():
                logits = model(x).float()  # (B, K)
            act = _feature_map(captured, model)
            if targets is None:
                targets = logits.argmax(1)
            targets = targets.to(logits.device).long()
            score = logits.gather(1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
        model.train(was_training)
    return act.detach().float(), grad.float(), logits.detach(), targets


def _feature_map(captured: list, model: nn.Module) -> torch.Tensor:
    act = captured[-1] if captured else None
    if not isinstance(act, torch.Tensor) or act.ndim != 4:
        shape = tuple(act.shape) if isinstance(act, torch.Tensor) else type(act).__name__
        name = model.default_cfg.get("architecture", type(model).__name__)
        raise CnnkitError(
            f"{name}: its feature_layer gives {shape}, not a (B, C, h, w) map; Grad-CAM needs "
            "a convolutional network"
        )
    if not act.requires_grad:
        raise CnnkitError("the feature map is not connected to the input; cannot take gradients")
    return act


def _unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Scale each (H, W) map to 0..1; a flat map (no positive evidence) stays all zeros."""
    flat = maps.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = (high - low)[:, None, None]
    return torch.where(span > EPS, (maps - low[:, None, None]) / span.clamp(min=EPS), 0.0)
