"""Classification metrics from per-image logits, for the report: everything the task's
``summarize`` gives, plus calibration (per_class and summarize live in ``cnnkit.tasks``)."""

from __future__ import annotations

import torch

from cnnkit.tasks.classification import summarize


def from_logits(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Everything ``summarize`` gives, plus calibration, from per-image logits (N, K) and labels.

    The loss is the plain cross-entropy (no label smoothing), as in ``engine.loop.evaluate``.
    """
    logits, labels = logits.float(), labels.long()
    num_classes = len(classes)
    k = min(5, num_classes)
    predicted = logits.argmax(1)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    seen = max(len(labels), 1)
    raw = {
        "loss": torch.nn.functional.cross_entropy(logits, labels).item() if len(labels) else 0.0,
        "acc": (predicted == labels).sum().item() / seen,
        "acc5": (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum().item() / seen,
        "images": len(labels),
        "confusion": confusion.view(num_classes, num_classes),
    }
    return {**summarize(raw, classes), "calibration": calibration(logits.softmax(1), labels)}


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """Expected calibration error and the reliability diagram's bins.

    Images are binned by their top probability (confidence) into ``bins`` equal-width bins;
    ECE is the image-weighted mean of |accuracy - confidence| over the bins.
    """
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # bin b holds confidences in (edges[b], edges[b + 1]]; a confidence of exactly 0 goes to bin 0
    index = (torch.bucketize(confidence.double(), edges, right=False) - 1).clamp(0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        acc = correct[members].mean().item() if count else 0.0
        conf = confidence[members].double().mean().item() if count else 0.0
        ece += count / max(len(labels), 1) * abs(acc - conf)
        rows.append(
            {"lo": edges[b].item(), "hi": edges[b + 1].item(), "count": count, "acc": acc,
             "confidence": conf}
        )  # fmt: skip
    return {"ece": ece, "bins": rows}
