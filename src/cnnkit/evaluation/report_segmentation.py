"""The report's sections for a segmentation run (``report.write_report`` picks them by task).

One pass over the split with the task's own metrics (the pixel confusion matrix summed on the
device) that also keeps each image's mIoU, then: headline mIoU/Dice/pixel accuracy, per-class IoU
(bars and a table with Dice and each class's share of the pixels), the pixel confusion matrix,
prediction against truth overlaid on the first images, and the images with the lowest mIoU.
Only the images shown are predicted a second time: the pass keeps no logits, so the report of a
large split needs no more memory than its validation does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cnnkit.data.masks import overlay
from cnnkit.data.memory import run_loader
from cnnkit.engine.loop import evaluate
from cnnkit.evaluation import plots
from cnnkit.evaluation.tta import with_tta
from cnnkit.tasks.segmentation import Segmentation, SegmentationMetrics, image_miou

FIGURE_NAMES = {"curves.png", "iou.png", "confusion.png", "overlays.png", "worst.png"}
OVERLAYS = 6  # first images of the split shown as image | truth | prediction
WORST = 6  # images with the lowest mIoU shown the same way


class _PerImage(SegmentationMetrics):
    """The task's metrics, also keeping each image's mIoU (on the device until the end)."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        super().__init__(num_classes, device, full=True)
        self.images: list[torch.Tensor] = []

    def update(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        super().update(loss, outputs, targets)
        self.images.append(image_miou(outputs, targets))


def sections(
    figures,
    model,
    dataset,
    rt,
    batch_size: int,
    data_cfg,
    task: Segmentation,
    tta: str | None = None,
    outputs: tuple | None = None,
) -> dict:
    """The template context of the segmentation sections; figures are added to ``figures``.
    ``tta``: the run's (as its final score had it); ``outputs`` is not used: a split's
    (N, K, H, W) outputs are never kept, so the pass below is streamed."""
    meta = model.meta
    classes, pre = meta["classes"], meta["preprocessing"]
    loader = run_loader(
        dataset, pre, None, data_cfg, batch_size, train=False, seed=0, device=rt.device,
        memory_format=rt.memory_format,
    )  # fmt: skip
    metrics = _PerImage(len(classes), rt.device)
    scorer = with_tta(model, tta or "none")
    raw = evaluate(scorer, loader, rt, metrics, task.loss(0.0, None))
    per_image = torch.cat(metrics.images).cpu() if metrics.images else torch.empty(0)
    summary = task.summarize(raw, classes)
    total = max(sum(r["pixels"] for r in summary["per_class"]), 1)
    rows = [{**r, "share": r["pixels"] / total} for r in summary["per_class"]]
    iou = [r["iou"] for r in rows]
    confusion = np.asarray(summary["confusion"])
    first = list(range(min(OVERLAYS, len(dataset))))
    worst = _worst(per_image, WORST)
    return {
        "metrics": summary,
        "rows": rows,
        "iou": figures.add("iou.png", plots.class_bars(classes, iou, "IoU per class")),
        "confusion": figures.add(
            "confusion.png",
            plots.confusion_figure(confusion, classes, plots.confusion_classes(confusion)),
        ),
        "overlays": _overlays(figures, "overlays.png", scorer, pre, dataset, first, per_image, rt),
        "worst": _overlays(figures, "worst.png", scorer, pre, dataset, worst, per_image, rt),
        "worst_count": len(worst),
    }


def _worst(per_image: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` images with the lowest mIoU (images with no valid pixel last)."""
    scores = torch.nan_to_num(per_image.double(), nan=math.inf)
    return scores.argsort(stable=True)[:count].tolist()


@torch.inference_mode()
def _overlays(figures, name: str, model, pre, dataset, indices, per_image, rt) -> str | None:
    """Image, truth and prediction (class colours over the image) for each of ``indices``;
    ``pre``: the model's preprocessing."""
    if not indices:
        return None
    items = [dataset[i] for i in indices]  # (image, mask) each, read once
    batch = torch.stack([image for image, _ in items])
    with rt.autocast():
        logits = model(rt.to_device(batch))
    predicted = logits.float().argmax(1).cpu().numpy()
    tiles, captions = [], []
    for j, i in enumerate(indices):
        image = (plots.display_image(batch[j], pre["mean"], pre["std"]) * 255).round()
        image = image.astype(np.uint8)
        truth = items[j][1].numpy()
        tiles += [image, overlay(image, truth), overlay(image, predicted[j])]
        caption = plots.file_caption(dataset, i, f"image {i}")
        captions += [caption, "truth", f"prediction\nmIoU {float(per_image[i]):.3f}"]
    return figures.add(name, plots.image_grid(tiles, captions, cols=6))
