"""Model zoo, layer-spec networks and torchvision/timm adapters behind one classifier contract.

Every model from ``create_model`` has ``forward_features`` (B,C,H,W) -> (B,F,h,w),
``forward_head(x, pre_logits=False)``, ``forward``, ``reset_classifier(num_classes)``,
``get_classifier()``, ``num_classes`` and a ``default_cfg`` with ``input_size`` (C,H,W), ``mean``,
``std``, ``feature_layer`` (for Grad-CAM) and ``classifier`` (the head's dotted name).

Your own model: ``create_model("pkg.module:Net")``, ``@register_model`` builders, and
``as_classifier(module, ...)`` for a module instance (``custom.py``, ``rebuild.py``);
``layer_table`` describes any model layer by layer (``summary.py``).
"""

# The family modules register their builders on import.
from cnnkit.models import heads, mobilenet, resnet, simple, speedrun, unet  # noqa: F401
from cnnkit.models._registry import (
    builder_options,
    create_model,
    head_parameters,
    head_prefix,
    list_models,
    load_state_into,
    model_info,
    model_task,
    register_head,
    register_model,
    summary_rows,
)
from cnnkit.models.custom import WrappedClassifier, as_classifier, is_import_path
from cnnkit.models.rebuild import check_logits, model_from_meta, name_for, rebuild, rebuild_note
from cnnkit.models.summary import LayerTable, layer_table, model_for_layers

__all__ = [
    "LayerTable",
    "WrappedClassifier",
    "as_classifier",
    "builder_options",
    "check_logits",
    "create_model",
    "head_parameters",
    "head_prefix",
    "is_import_path",
    "layer_table",
    "list_models",
    "load_state_into",
    "model_for_layers",
    "model_from_meta",
    "model_info",
    "model_task",
    "register_head",
    "name_for",
    "rebuild",
    "rebuild_note",
    "register_model",
    "summary_rows",
]
