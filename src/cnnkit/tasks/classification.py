"""Image classification: one class index per image, cross-entropy (label smoothing, class
weights), top-1/top-5 accuracy and a confusion matrix summed on the device, MixUp/CutMix, and
class balancing by sampler or loss weights."""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.data.doctor import IMBALANCE_RATIO
from cnnkit.data.transforms import batch_mix
from cnnkit.errors import CnnkitError
from cnnkit.tasks.base import Balance, Metrics, Task


class ClassificationMetrics(Metrics):
    """Loss and accuracy sums; with ``full`` also top-5 and the confusion matrix (rows: true
    class, columns: predicted). Targets may be soft (MixUp): accuracy then uses their argmax."""

    def __init__(self, num_classes: int, device: torch.device, full: bool) -> None:
        self.k, self.full = num_classes, full
        width = 3 + (1 + num_classes * num_classes if full else 0)
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self._sums = torch.zeros(width, device=device, dtype=dtype)

    def update(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        labels = targets.argmax(1) if targets.dim() == 2 else targets  # soft (mixed) targets
        predicted = outputs.argmax(1)
        n = labels.shape[0]
        self._sums[0] += loss.detach() * n
        self._sums[1] += (predicted == labels).sum()
        self._sums[2] += n
        if self.full:
            top = outputs.topk(min(5, self.k), dim=1).indices
            self._sums[3] += (top == labels[:, None]).any(1).sum()
            cells = torch.bincount(labels * self.k + predicted, minlength=self.k * self.k)
            self._sums[4:] += cells

    def sums(self) -> torch.Tensor:
        return self._sums

    def summary(self, sums: torch.Tensor) -> dict:
        values = sums.cpu()
        seen = max(values[2].item(), 1.0)
        out = {"loss": values[0].item() / seen, "acc": values[1].item() / seen}
        out["images"] = int(values[2].item())
        if self.full:
            out["acc5"] = values[3].item() / seen
            out["confusion"] = values[4:].round().long().view(self.k, self.k)
        return out


class Classification(Task):
    name = "classification"
    target = "class index"
    train_fields = ("loss", "acc")
    val_fields = ("loss", "acc", "acc5")
    shown = ("train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc")
    headline = ("acc",)

    def loss(self, label_smoothing: float, class_weights: torch.Tensor | None) -> nn.Module:
        return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)

    def metrics(self, num_classes: int, device: torch.device, train: bool) -> Metrics:
        return ClassificationMetrics(num_classes, device, full=not train)

    def balance(self, mode: str, targets, num_classes: int) -> Balance:
        """ "auto" samples balanced batches when the largest class is IMBALANCE_RATIO times the
        smallest or more. Streamed shards list no labels up front: no balancing there (asking
        for it is an error)."""
        if len(targets) == 0:
            if mode in ("sampler", "loss"):
                raise CnnkitError(
                    f"--balance {mode} needs every training image's class up front; data "
                    "streamed from shards has none: use --balance none"
                )
            return Balance("none")
        labels = torch.as_tensor(targets, dtype=torch.long)
        counts = torch.bincount(labels, minlength=num_classes).double()
        present = counts[counts > 0]
        imbalanced = bool(present.max() >= IMBALANCE_RATIO * present.min())
        if mode == "auto":
            mode = "sampler" if imbalanced else "none"
        counts = counts.clamp_min(1)
        if mode == "sampler":
            return Balance(mode, sample_weights=(1.0 / counts)[labels], imbalanced=imbalanced)
        if mode == "loss":  # n / (k * count): each class contributes equally on average
            weights = (counts.sum() / (len(counts) * counts)).float()
            return Balance(mode, class_weights=weights, imbalanced=imbalanced)
        return Balance(mode, imbalanced=imbalanced)

    def mix(self, augment, num_classes: int):
        return batch_mix(augment, num_classes)

    def val_extras(self, val: dict, classes: list[str], balance: Balance) -> dict:
        if not balance.imbalanced:
            return {}
        rows = [r for r in per_class(val["confusion"], classes) if r["support"] > 0]
        out = {"val_balanced_acc": sum(r["recall"] for r in rows) / max(len(rows), 1)}
        out.update({f"val_recall_{r['class']}": r["recall"] for r in rows})
        return out

    def predict(self, outputs: torch.Tensor, classes: list[str], top_k: int) -> list[list[dict]]:
        """The ``top_k`` classes of each row of probabilities (B, num_classes), best first."""
        k = max(1, min(top_k, len(classes)))
        values, indices = outputs.topk(k, dim=1)
        return [
            [
                {"class": classes[i], "index": int(i), "prob": float(v)}
                for v, i in zip(row_v, row_i, strict=True)
            ]
            for row_v, row_i in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def summarize(self, raw: dict, classes: list[str]) -> dict:
        return summarize(raw, classes)


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
    """Per-class metrics, balanced accuracy and macro F1 from an evaluation summary."""
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
