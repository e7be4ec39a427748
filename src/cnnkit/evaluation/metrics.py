"""Classification metrics derived from a confusion matrix (rows: true class, columns: predicted)."""

from __future__ import annotations

import torch


def per_class(confusion: torch.Tensor, classes: list[str]) -> list[dict]:
    """Precision, recall, F1 and support per class; a class never predicted has precision 0."""
    cm = confusion.double()
    tp = cm.diag()
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(
        denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp)
    )
    return [
        {
            "class": name,
            "precision": precision[i].item(),
            "recall": recall[i].item(),
            "f1": f1[i].item(),
            "support": int(actual[i].item()),
        }
        for i, name in enumerate(classes)
    ]


def summarize(raw: dict, classes: list[str]) -> dict:
    """Per-class metrics, balanced accuracy and macro F1 from ``engine.loop.evaluate``'s output."""
    rows = per_class(raw["confusion"], classes)
    present = [r for r in rows if r["support"] > 0]
    return {
        "loss": raw["loss"],
        "acc": raw["acc"],
        "acc5": raw["acc5"],
        "balanced_acc": sum(r["recall"] for r in present) / max(len(present), 1),
        "macro_f1": sum(r["f1"] for r in present) / max(len(present), 1),
        "images": raw["images"],
        "classes": list(classes),
        "per_class": rows,
        "confusion": raw["confusion"].tolist(),
    }
