"""The end-of-training report: one self-contained ``report.html`` plus the same figures as PNG.

``write_report`` scores a trained model on one labelled split, keeping every image's logits, and
lays out what a user asks after training: headline metrics, training curves from metrics.csv,
per-class precision/recall/F1 (worst first), the confusion matrix (counts and row-normalised;
beyond 30 classes only the most confused ones, with a note), calibration (reliability diagram,
ECE), the most confidently wrong images, Grad-CAM overlays for a few images per class, the model
summary, the run's config and its environment. Figures are PNGs written next to the report and
embedded in it as data: URIs, so the HTML opens offline with no external file or script. The
page is rendered from the Jinja2 template ``templates/report.html.j2`` (package data).

What differs by task is one entry of ``SECTIONS``: a function that scores the split and draws the
task's figures, and a template that extends ``report_base.html.j2`` (the curves, model, config
and environment sections every report has). Segmentation's live in ``report_segmentation``. The
drawing stays here, not in ``cnnkit.tasks``: tasks sit below the evaluation layer and must not
import matplotlib; what a figure needs from the task (per-image mIoU, its metrics) comes from it.
"""

from __future__ import annotations

import base64
import csv
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
import yaml
from torch import nn

from cnnkit import __version__, tasks
from cnnkit.config import DataConfig, load
from cnnkit.data.memory import run_loader
from cnnkit.engine import runtime
from cnnkit.errors import CnnkitError
from cnnkit.evaluation import plots
from cnnkit.evaluation.gradcam import compute_cams
from cnnkit.evaluation.metrics import from_logits
from cnnkit.evaluation.report_segmentation import FIGURE_NAMES as SEGMENTATION_FIGURES
from cnnkit.evaluation.report_segmentation import sections as segmentation_sections
from cnnkit.evaluation.tta import with_tta
from cnnkit.fileio import atomic_write_bytes
from cnnkit.models import model_info

REPORT_FILE = "report.html"
METRICS_FILE = "metrics.csv"
MODEL_FILE = "model.safetensors"
FIGURE_NAMES = {
    "curves.png", "confusion.png", "reliability.png", "mistakes.png", "gradcam.png",
    *SEGMENTATION_FIGURES,
}  # fmt: skip
MISTAKES = 18  # most confidently wrong images shown
CAM_CLASSES = 12  # classes with Grad-CAM overlays (the worst by F1 when there are more)
CAM_PER_CLASS = 2
MAX_LAYER_ROWS = 80


@dataclass
class Figures:
    """PNG bytes by file name, in the order they were made."""

    png: dict[str, bytes] = field(default_factory=dict)

    def add(self, name: str, fig) -> str:
        self.png[name] = plots.png(fig)
        return name

    def data_uri(self, name: str) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png[name]).decode()


def check_run(run_dir: Path) -> None:
    """A run folder the report can be made from: it exists and has metrics.csv and the model."""
    if not run_dir.is_dir():
        raise CnnkitError(f"run folder not found: {run_dir}")
    for name, why in ((METRICS_FILE, "training curves"), (MODEL_FILE, "the trained model")):
        if not (run_dir / name).is_file():
            raise CnnkitError(
                f"run folder {run_dir} has no {name} ({why}); did its training finish an epoch?"
            )


def read_history(path: Path) -> list[dict]:
    """Rows of metrics.csv as floats (``epoch`` as int)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        history = [{k: float(v) for k, v in row.items()} for row in rows]
    except (OSError, ValueError, TypeError) as e:
        raise CnnkitError(f"cannot read {path}: {e}") from None
    if not history or "epoch" not in history[0]:
        raise CnnkitError(f"{path} holds no epochs; did the training finish an epoch?")
    for row in history:
        row["epoch"] = int(row["epoch"])
    return history


def write_report(
    run_dir: str | Path,
    model: nn.Module,
    dataset,
    split: str,
    rt: runtime.Runtime,
    *,
    out_dir: str | Path | None = None,
    batch_size: int = 256,
    data_cfg: DataConfig | None = None,
    tta: str = "none",
    outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Path:
    """Score ``model`` (from ``cnnkit.load_model``) on ``dataset`` and write the report of the
    run in ``run_dir`` into ``out_dir`` (default: the run folder); returns the HTML's path.
    ``rt``: the runtime to score with (the training run's, or ``runtime.for_model``).

    ``data_cfg``: loader settings (workers, decode cache); default ``DataConfig()``. ``tta``:
    the test-time augmentation of the scores (``evaluation.tta``). ``outputs``: (logits (N, K),
    labels (N,)) of ``dataset`` already scored that way (the end of training passes its final
    score's), so the split is not run through the model again.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    check_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    history = read_history(run_dir / METRICS_FILE)
    if getattr(model, "meta", None) is None:
        raise CnnkitError("write_report needs a model from cnnkit.load_model (it carries .meta)")
    model = model.to(rt.device, memory_format=rt.memory_format).eval()
    meta = model.meta
    task = run_task(meta, run_dir)
    draw, template = SECTIONS[task.name]
    figures = Figures()
    context = {"run": run_dir.resolve().name, "split": split, "tta": tta}
    data_cfg = data_cfg or DataConfig()
    context.update(draw(figures, model, dataset, rt, batch_size, data_cfg, task, tta, outputs))
    curves = plots.training_curves(history, *CURVES[task.name])
    context["curves"] = figures.add("curves.png", curves)
    context["model"] = _model_summary(model, meta, rt.device)
    context["config"] = _config_text(run_dir)
    context["environment"] = _environment(rt, meta, history, run_dir)
    context["environment"]["report time"] = f"{time.perf_counter() - started:.1f} s"
    html = render(context, figures, template)
    for name, data in figures.png.items():
        atomic_write_bytes(out / name, data)
    for stale in FIGURE_NAMES - figures.png.keys():  # e.g. mistakes.png once nothing is wrong
        (out / stale).unlink(missing_ok=True)
    atomic_write_bytes(out / REPORT_FILE, html.encode())
    return out / REPORT_FILE


def run_task(meta: dict, run_dir: Path) -> tasks.Task:
    """The task the model file names, with the run's own settings (its loss weights) when the
    run folder has its config."""
    task = tasks.get(meta.get("task", "classification"))
    config = run_dir / "config.yaml"
    return task.configured(load(config).train) if config.is_file() else task


def _classification(
    figures: Figures, model, dataset, rt, batch_size, data_cfg, task, tta, outputs
) -> dict:
    """The classification sections from every image's (logits, labels) with ``tta``: the
    given ``outputs`` (the final score's), else scored here; then metrics and figures."""
    if outputs is None:
        outputs = collect_logits(model, dataset, rt, batch_size, data_cfg, tta)
    logits, labels = outputs
    meta = model.meta
    metrics = from_logits(logits, labels, meta["classes"])
    return {
        "metrics": metrics,
        "worst_first": sorted(metrics["per_class"], key=lambda r: (r["f1"], r["recall"])),
        "confusion": _confusion(figures, metrics),
        "reliability": figures.add(
            "reliability.png", plots.reliability_figure(metrics["calibration"])
        ),
        "mistakes": _mistakes(figures, dataset, logits, labels, meta),
        "gradcam": _gradcam(figures, model, dataset, labels, metrics, rt),
    }


# task -> (its sections, its template); templates extend report_base.html.j2. A sections
# function takes (figures, model, dataset, rt, batch_size, data_cfg, task, tta, outputs): the
# split's outputs already scored with ``tta`` (the final score's), or None to score them itself
SECTIONS = {
    "classification": (_classification, "report.html.j2"),
    "segmentation": (segmentation_sections, "report_segmentation.html.j2"),
}
CURVES = {"classification": ("acc", "accuracy"), "segmentation": ("miou", "mIoU")}


@torch.inference_mode()
def collect_logits(
    model: nn.Module, dataset, rt, batch_size: int, data_cfg: DataConfig, tta: str = "none"
):
    """(logits (N, K) float32, labels (N,)) on the CPU, in dataset order; averaged over the
    views of ``tta``."""
    pre = model.meta["preprocessing"]
    model = with_tta(model, tta)
    loader = run_loader(
        dataset, pre, None, data_cfg, batch_size, train=False, seed=0, device=rt.device,
        memory_format=rt.memory_format,
    )  # fmt: skip
    outputs, targets = [], []
    for images, labels in loader:
        with rt.autocast():
            outputs.append(model(rt.to_device(images)).float().cpu())
        targets.append(torch.as_tensor(labels))
    if not outputs:
        raise CnnkitError("the split to report on holds no images")
    return torch.cat(outputs), torch.cat(targets).long()


def _confusion(figures: Figures, metrics: dict) -> dict:
    confusion = np.asarray(metrics["confusion"])
    classes = metrics["classes"]
    shown = plots.confusion_classes(confusion)
    note = ""
    if len(shown) < len(classes):
        note = (
            f"{len(classes)} classes: showing the {len(shown)} involved in the most errors "
            "(rows still normalised over all predictions)"
        )
    fig = plots.confusion_figure(confusion, classes, shown)
    return {"image": figures.add("confusion.png", fig), "note": note}


def _mistakes(figures: Figures, dataset, logits, labels, meta) -> dict | None:
    """The wrong predictions made with the highest probability."""
    probs = logits.softmax(1)
    confidence, predicted = probs.max(1)
    wrong = torch.nonzero(predicted != labels).flatten()
    if len(wrong) == 0:
        return None
    order = wrong[confidence[wrong].argsort(descending=True)][:MISTAKES].tolist()
    classes, pre = meta["classes"], meta["preprocessing"]
    images = [plots.display_image(dataset[i][0], pre["mean"], pre["std"]) for i in order]
    # one class per line: "true automobile · pred airplane" is wider than a tile
    captions = [
        f"{_name(dataset, i)}true {classes[labels[i]]} p={probs[i, labels[i]]:.2f}\n"
        f"pred {classes[predicted[i]]} p={confidence[i]:.2f}"
        for i in order
    ]
    fig = plots.image_grid(images, captions)
    return {"image": figures.add("mistakes.png", fig), "count": len(wrong), "shown": len(order)}


def _name(dataset, index: int) -> str:
    name = plots.file_caption(dataset, index, "")
    return f"{name}\n" if name else ""


def _gradcam(figures: Figures, model, dataset, labels, metrics: dict, rt) -> dict | None:
    """Grad-CAM of the predicted class for the first images of each class (the worst classes
    when there are many)."""
    classes = metrics["classes"]
    chosen = list(range(len(classes)))
    if len(chosen) > CAM_CLASSES:
        by_f1 = sorted(chosen, key=lambda c: metrics["per_class"][c]["f1"])
        chosen = sorted(c for c in by_f1 if metrics["per_class"][c]["support"])[:CAM_CLASSES]
    indices = [
        i for c in chosen for i in torch.nonzero(labels == c).flatten()[:CAM_PER_CLASS].tolist()
    ]
    if not indices:
        return None
    batch = torch.stack([dataset[i][0] for i in indices])
    try:
        cams = compute_cams(model, rt.to_device(batch), autocast=rt.autocast())
    except CnnkitError as e:  # e.g. a vision transformer: no feature map; the rest still helps
        return {"image": None, "note": f"not available: {e}"}
    pre = model.meta["preprocessing"]
    images, captions = [], []
    for j, i in enumerate(indices):
        image = plots.display_image(batch[j], pre["mean"], pre["std"])
        images.append(plots.overlay(image, cams.maps[j]))
        target = int(cams.targets[j])
        captions.append(
            f"true {classes[labels[i]]}\npred {classes[target]} p={cams.probs[j, target]:.2f}"
        )
    note = ""
    if len(classes) > CAM_CLASSES:
        note = f"the {len(chosen)} classes with the lowest F1 of {len(classes)}"
    fig = plots.image_grid(images, captions, cols=2 * min(len(chosen), 3))
    return {"image": figures.add("gradcam.png", fig), "note": note}


def _model_summary(model: nn.Module, meta: dict, device) -> dict:
    input_size = (meta["in_chans"], *meta["preprocessing"]["input_size"])
    info = model_info(model, input_size)
    return {
        "arch": meta["arch"],
        "kwargs": meta.get("kwargs") or {},
        "input_size": "x".join(map(str, input_size)),
        "params": info["params"],
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gflops": info["gflops"],
        "feature_layer": model.default_cfg.get("feature_layer"),
        "layers": layer_rows(model, input_size, device),
    }


def layer_rows(model: nn.Module, input_size: tuple, device) -> list[dict]:
    """Modules up to two levels deep with their output shape and parameter count, for one
    image of ``input_size`` (C, H, W)."""
    shapes: dict[str, str] = {}
    modules = [(n, m) for n, m in model.named_modules() if n and n.count(".") <= 1]

    def record(name: str):
        def hook(_module, _inputs, out) -> None:  # returning a value would replace the output
            shapes.setdefault(name, _shape(out))

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in modules[:MAX_LAYER_ROWS]]
    try:
        with torch.inference_mode():
            model(torch.zeros((1, *input_size), device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return [
        {
            "name": name,
            "type": type(module).__name__,
            "output": shapes.get(name, ""),
            "params": sum(p.numel() for p in module.parameters()),
            "depth": name.count("."),
        }
        for name, module in modules[:MAX_LAYER_ROWS]
    ]


def _shape(out) -> str:
    return "x".join(map(str, out.shape[1:])) if isinstance(out, torch.Tensor) else "-"


def _config_text(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    return path.read_text() if path.is_file() else "(no config.yaml in the run folder)"


def _environment(rt, meta: dict, history: list[dict], run_dir: Path) -> dict:
    config = run_dir / "config.yaml"
    cfg = (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}
    planned = cfg.get("runtime", {})
    train_seconds = sum(r.get("epoch_time", 0.0) for r in history)
    return {
        "cnnkit": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "training runtime (config)": ", ".join(f"{k} {v}" for k, v in planned.items()) or "?",
        "report runtime": rt.describe(),
        "seed": cfg.get("train", {}).get("seed", "?"),
        "dataset": meta.get("dataset", "?"),
        "dataset fingerprint": meta.get("fingerprint", "?"),
        "epochs": len(history),
        "training time (sum of epochs)": _duration(train_seconds),
    }


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s"


def render(context: dict, figures: Figures, template: str = "report.html.j2") -> str:
    """The HTML page from the package's Jinja2 template; ``img(name)`` embeds a figure."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("cnnkit.evaluation", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
    )
    return env.get_template(template).render(**context, img=figures.data_uri)
