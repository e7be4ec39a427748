"""Feature maps at strides 4, 8, 16 and 32 from a classifier, for the decoder heads (``heads.py``).

Any model ``torch.fx`` can trace (the zoo, ``tv:`` models, your own) is cut by its graph: a probe
image of ``PROBE`` px runs through the traced model once (shapes only), and for each stride the
last node is kept that *every* path from the input to the output passes through: a cut of the
graph, such as the output of a residual stage, never a tensor inside a block whose shortcut runs
beside it. The traced module returns those maps and nothing after them (the classifier is
dropped), and keeps the model's own submodule names, so its state dict is the classifier's
without the head. ``timm:`` models use timm's own ``features_only`` models.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from cnnkit.errors import CnnkitError
from cnnkit.models.adapters import timm_model

STRIDES = (4, 8, 16, 32)  # what the decoders take, finest first
PROBE = 128  # px: stride 32 still leaves a 4x4 map


class FeatureInfo(nn.Module):
    """A feature extractor ``body`` (returns maps) and which of its maps to keep: ``forward``
    gives the kept maps, finest first; ``channels`` and ``strides`` describe them."""

    def __init__(self, body: nn.Module, keep: list[int], channels: list[int], strides: list[int]):
        super().__init__()
        self.body, self.keep = body, keep
        self.channels, self.strides = channels, strides

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.body(x)
        return [maps[i] for i in self.keep]


def traced_features(model: nn.Module, name: str) -> FeatureInfo:
    """``model`` (a classifier) cut at strides 4/8/16/32 (see the module docstring)."""
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds for untraceable code
        raise CnnkitError(
            f"cannot find the feature maps of '{name}': torch.fx cannot trace it "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use a backbone "
            f"such as resnet18_slim, mobilenetv2, tv:resnet18 or a timm: model"
        ) from None
    nodes = _probe(graph_module, model, name)
    chosen = _cuts_by_stride(nodes)
    if not chosen:
        raise CnnkitError(f"'{name}' has no feature map at strides {STRIDES} on {PROBE} px")
    graph = graph_module.graph
    for node in [n for n in graph.nodes if n.op == "output"]:
        graph.erase_node(node)
    graph.output(tuple(node for node, _, _ in chosen))
    graph.eliminate_dead_code()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()
    channels = [c for _, c, _ in chosen]
    strides = [s for _, _, s in chosen]
    return FeatureInfo(graph_module, list(range(len(chosen))), channels, strides)


def _probe(graph_module: fx.GraphModule, model: nn.Module, name: str) -> list[fx.Node]:
    """The graph's nodes with their output shapes recorded (``meta["tensor_meta"]``)."""
    ref = next(model.parameters(), torch.empty(0))
    in_chans = model.default_cfg["input_size"][0]
    x = torch.zeros(1, in_chans, PROBE, PROBE, device=ref.device, dtype=ref.dtype)
    was_training = model.training
    graph_module.eval()  # batch norm of a batch of 1
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(x)
    except Exception as e:  # noqa: BLE001 - whatever the model raises on the probe
        raise CnnkitError(
            f"'{name}' cannot run on a {PROBE}x{PROBE} probe to find its feature maps: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    finally:
        graph_module.train(was_training)
    return list(graph_module.graph.nodes)


def _cuts_by_stride(nodes: list[fx.Node]) -> list[tuple[fx.Node, int, int]]:
    """(node, channels, stride) of the last cut node at each of ``STRIDES``, finest first. A
    node is a cut when no tensor made before it is used after it (parameters and sizes, which
    are not activations, do not count)."""
    index = {node: i for i, node in enumerate(nodes)}
    reach, last = -1, {}
    for i, node in enumerate(nodes):
        shape = _shape(node)
        if reach <= i and shape is not None and len(shape) == 4 and shape[-1] > 0:
            stride = PROBE // shape[-1]
            if stride in STRIDES and PROBE % shape[-1] == 0:
                last[stride] = (node, int(shape[1]), stride)
        if shape is not None and node.op != "get_attr":
            reach = max([reach, *(index[user] for user in node.users)])
    return [last[s] for s in STRIDES if s in last]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def timm_features(name: str, in_chans: int, pretrained: bool, **kwargs) -> FeatureInfo:
    """``timm:<name>`` as timm's ``features_only`` model, keeping its maps at ``STRIDES``."""
    body = timm_model(name, pretrained, features_only=True, in_chans=in_chans, **kwargs)
    reductions, channels = body.feature_info.reduction(), body.feature_info.channels()
    last = {r: i for i, r in enumerate(reductions) if r in STRIDES}  # the last map per stride
    keep = [last[s] for s in STRIDES if s in last]
    if not keep:
        raise CnnkitError(f"timm:{name} has no feature map at strides {STRIDES}: {reductions}")
    return FeatureInfo(body, keep, [channels[i] for i in keep], [reductions[i] for i in keep])
