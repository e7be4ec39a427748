"""Model zoo, layer-spec networks and torchvision/timm adapters behind one classifier contract.

Every model from ``create_model`` has ``forward_features`` (B,C,H,W) -> (B,F,h,w),
``forward_head(x, pre_logits=False)``, ``forward``, ``reset_classifier(num_classes)``,
``get_classifier()``, ``num_classes`` and a ``default_cfg`` with ``input_size`` (C,H,W), ``mean``,
``std``, ``feature_layer`` (for Grad-CAM) and ``classifier`` (the head's dotted name).
"""

# The family modules register their builders on import.
from cnnkit.models import mobilenet, resnet, simple, speedrun  # noqa: F401
from cnnkit.models._registry import (
    builder_options,
    create_model,
    head_parameters,
    list_models,
    load_state_into,
    model_info,
    register_model,
    summary_rows,
)
from cnnkit.models.saved import rebuild

__all__ = [
    "builder_options",
    "create_model",
    "head_parameters",
    "list_models",
    "load_state_into",
    "model_info",
    "rebuild",
    "register_model",
    "summary_rows",
]
