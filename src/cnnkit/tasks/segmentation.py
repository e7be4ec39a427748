"""Semantic segmentation: a class index per pixel.

Targets are masks (B, H, W) int64 of class indices, with ``IGNORE`` (255) on pixels that count
for nothing (VOC's object borders, the padding of a shifted crop). The loss is a weighted sum of
per-pixel cross-entropy and soft Dice (``ce_weight``, ``dice_weight``: ``train.*`` keys): CE
gives every pixel a gradient, Dice keeps small classes from drowning in the background. The
metrics are one confusion matrix (K x K, rows: true class) summed on the device with a bincount
per batch and read once per epoch; mIoU, per-class IoU, Dice and pixel accuracy all come from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.data.masks import IGNORE  # mask value of pixels neither scored nor learnt
from cnnkit.errors import CnnkitError
from cnnkit.tasks.base import Balance, Metrics, Task

DICE_SMOOTH = 1.0  # added to both sides of the Dice ratio: an absent class scores 1, not 0/0


class SegmentationLoss(nn.Module):
    """``ce_weight`` x cross-entropy + ``dice_weight`` x (1 - mean soft Dice over classes).

    logits (B, K, H, W) float, masks (B, H, W) int64 with IGNORE where nothing is learnt."""

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        label_smoothing: float = 0.0,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.ce_weight, self.dice_weight = ce_weight, dice_weight
        self.ce = nn.CrossEntropyLoss(
            weight=class_weights, ignore_index=IGNORE, label_smoothing=label_smoothing
        )

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        loss = self.ce(logits, masks) * self.ce_weight if self.ce_weight else 0.0
        if self.dice_weight:
            loss = loss + self.dice_weight * (1.0 - soft_dice(logits, masks))
        return loss


def soft_dice(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over classes of 2|P.T| / (|P| + |T|) on softmax probabilities, over the whole batch,
    ignored pixels left out of both."""
    k = logits.shape[1]
    valid = (masks != IGNORE).unsqueeze(1)  # (B, 1, H, W)
    probs = logits.softmax(1) * valid
    truth = F.one_hot(masks.masked_fill(~valid[:, 0], 0), k).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    overlap = (probs * truth).sum(dims)
    total = probs.sum(dims) + truth.sum(dims)
    return ((2 * overlap + DICE_SMOOTH) / (total + DICE_SMOOTH)).mean()


class SegmentationMetrics(Metrics):
    """Sums: [loss x images, images, then the K x K confusion matrix of valid pixels]. The
    summary holds numbers only (a training progress line prints them all) unless ``full``: then
    also per-class IoU, Dice and pixel counts, and the confusion matrix."""

    def __init__(self, num_classes: int, device: torch.device, full: bool) -> None:
        self.k, self.full = num_classes, full
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self._sums = torch.zeros(2 + num_classes * num_classes, device=device, dtype=dtype)

    def update(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        n = targets.shape[0]
        self._sums[0] += loss.detach() * n
        self._sums[1] += n
        # ignored pixels go to one extra bin, cut off after counting (no boolean indexing: it
        # would wait for the device to know the count)
        kk = self.k * self.k
        cells = torch.where(targets != IGNORE, targets * self.k + outputs.argmax(1), kk)
        self._sums[2:] += torch.bincount(cells.flatten(), minlength=kk + 1)[:kk]

    def sums(self) -> torch.Tensor:
        return self._sums

    def summary(self, sums: torch.Tensor) -> dict:
        values = sums.cpu().double()
        images = values[1].item()
        confusion = values[2:].view(self.k, self.k)
        out = {"loss": values[0].item() / max(images, 1.0), "images": int(images)}
        found = scores(confusion)
        if not self.full:
            return {**out, **{key: found[key] for key in ("miou", "dice", "pixel_acc")}}
        return {**out, **found, "confusion": confusion.round().long()}


def scores(confusion: torch.Tensor) -> dict:
    """mIoU, mean Dice and pixel accuracy of a confusion matrix (K, K), and per-class IoU and
    Dice (NaN for a class absent from both truth and prediction; means skip those)."""
    cm = confusion.double()
    tp = cm.diag()
    truth, predicted = cm.sum(1), cm.sum(0)
    union = truth + predicted - tp
    present = union > 0
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(present, tp / union.clamp(min=1), nan)
    dice = torch.where(present, 2 * tp / (truth + predicted).clamp(min=1), nan)
    count = max(int(present.sum()), 1)
    return {
        "miou": float(iou[present].sum()) / count,
        "dice": float(dice[present].sum()) / count,
        "pixel_acc": float(tp.sum() / cm.sum().clamp(min=1)),
        "iou": iou.tolist(),
        "class_dice": dice.tolist(),
        "pixels": truth.long().tolist(),
    }


def image_miou(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each image's mIoU (B,) over the classes in its truth or prediction, ignored pixels left
    out (NaN for an image with no valid pixel); on the device, without a host sync."""
    b, k = outputs.shape[:2]
    cell = k * k + 1  # one confusion matrix per image plus a bin for ignored pixels
    pixels = torch.where(targets != IGNORE, targets * k + outputs.argmax(1), k * k)
    pixels = pixels + torch.arange(b, device=targets.device).view(b, 1, 1) * cell
    cm = torch.bincount(pixels.flatten(), minlength=b * cell).view(b, cell)[:, : k * k]
    cm = cm.view(b, k, k).double()
    tp = cm.diagonal(dim1=1, dim2=2)
    union = cm.sum(2) + cm.sum(1) - tp
    iou = tp / union.clamp(min=1)
    present = (union > 0).sum(1)
    return torch.where(present > 0, (iou * (union > 0)).sum(1) / present.clamp(min=1), torch.nan)


class Segmentation(Task):
    name = "segmentation"
    target = "mask of class indices"
    train_fields = ("loss", "miou", "pixel_acc")
    val_fields = ("loss", "miou", "dice", "pixel_acc")
    shown = ("train_loss", "train_miou", "val_loss", "val_miou", "val_pixel_acc")
    headline = ("miou", "pixel_acc")
    keeps_outputs = False  # (N, K, H, W) per split

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        self.ce_weight, self.dice_weight = ce_weight, dice_weight

    def configured(self, train_cfg) -> Segmentation:
        return Segmentation(train_cfg.ce_weight, train_cfg.dice_weight)

    def loss(self, label_smoothing: float, class_weights: torch.Tensor | None) -> nn.Module:
        return SegmentationLoss(self.ce_weight, self.dice_weight, label_smoothing, class_weights)

    def metrics(self, num_classes: int, device: torch.device, train: bool) -> Metrics:
        return SegmentationMetrics(num_classes, device, full=not train)

    def balance(self, mode: str, targets, num_classes: int) -> Balance:
        """``loss``: CE class weights n / (K x count) from the training masks' pixel counts;
        there is no per-image sampler (an image holds many classes), and ``auto`` is none."""
        if mode == "sampler":
            raise CnnkitError(
                "--balance sampler draws images by their class; a segmentation image holds "
                "many classes: use --balance loss (per-pixel class weights) or none"
            )
        if mode != "loss":
            return Balance("none")
        masks = torch.as_tensor(targets).long()
        counts = torch.bincount(masks[masks != IGNORE], minlength=num_classes)[:num_classes]
        counts = counts.double().clamp_min(1)
        weights = (counts.sum() / (num_classes * counts)).float()
        return Balance("loss", class_weights=weights, imbalanced=True)

    def val_extras(self, val: dict, classes: list[str], balance: Balance) -> dict:
        """Per-class IoU as ``val_iou_<class>`` (NaN when the class is absent from the split)."""
        return {f"val_iou_{name}": value for name, value in zip(classes, val["iou"], strict=True)}

    def predict(self, outputs: torch.Tensor, classes: list[str], top_k: int) -> list:
        """Class maps (H, W) int64, one per image, from outputs (B, K, H, W)."""
        return list(outputs.argmax(1))

    def summarize(self, raw: dict, classes: list[str]) -> dict:
        """A JSON-able evaluation summary: means, per-class IoU/Dice/pixels, the confusion."""
        per_class = [
            {"class": name, "iou": raw["iou"][i], "dice": raw["class_dice"][i]}
            | {"pixels": raw["pixels"][i]}
            for i, name in enumerate(classes)
        ]
        keep = ("loss", "miou", "dice", "pixel_acc", "images")
        return {
            **{key: raw[key] for key in keep},
            "classes": list(classes),
            "per_class": per_class,
            "confusion": raw["confusion"].tolist(),
        }
