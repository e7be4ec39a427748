"""The task seam: what differs between vision tasks (classification, segmentation...), so that the
engine (``fit``, ``train_one_epoch``, ``evaluate``) knows nothing task-specific.

A task names its targets, builds its loss, keeps its metrics as running sums on the device (one
host read per epoch), names the fields of a progress line and of a metrics.csv row, and turns a
model's outputs into predictions. A new task is a new module here plus an entry in
``cnnkit.tasks.TASKS``; nothing in the engine changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


class Metrics:
    """Running sums of one pass over the data, kept on the device.

    ``update`` must not synchronise with the host; ``sums`` is one 1-d float64 tensor (summed
    over processes by the engine, and stored in a checkpoint when an epoch is interrupted), and
    ``summary`` turns sums into plain numbers (``loss`` and ``images`` always among them)."""

    def update(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        raise NotImplementedError

    def sums(self) -> torch.Tensor:
        raise NotImplementedError

    def summary(self, sums: torch.Tensor) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class Balance:
    """How a run evens out unequal classes: per-sample draw weights for the sampler, per-class
    loss weights, and whether the classes were found imbalanced (metrics.csv adds recalls)."""

    mode: str  # sampler | loss | none
    sample_weights: torch.Tensor | None = None  # (N,) for the training split
    class_weights: torch.Tensor | None = None  # (num_classes,) for the loss
    imbalanced: bool = False


class Task:
    """Base of every task; see the module docstring."""

    name: str = ""
    target: str = ""  # what a target is, in words ("class index", "mask of class indices")
    train_fields: Sequence[str] = ("loss",)  # summary fields logged per epoch as train_<field>
    val_fields: Sequence[str] = ("loss",)  # ... and as val_<field>
    shown: Sequence[str] = ("train_loss", "val_loss")  # row fields printed per epoch
    headline: Sequence[str] = ("loss",)  # summary fields a score is read by (and shown without TTA)
    # whether the final score keeps its split's outputs for the report to reuse (False where a
    # split's outputs are too large to hold, e.g. (N, K, H, W) maps: the report streams its own)
    keeps_outputs = True

    def configured(self, train_cfg) -> Task:
        """The task with the run's own settings (``TrainConfig``, e.g. loss weights)."""
        return self

    def loss(self, label_smoothing: float, class_weights: torch.Tensor | None) -> nn.Module:
        raise NotImplementedError

    def metrics(self, num_classes: int, device: torch.device, train: bool) -> Metrics:
        raise NotImplementedError

    def balance(self, mode: str, targets, num_classes: int) -> Balance:
        """Class balancing for ``train.balance`` ``mode``; tasks without it train unbalanced."""
        return Balance("none")

    def mix(self, augment, num_classes: int) -> Callable | None:
        """A batch mixer (images, targets) -> (images, soft targets) for the run's ``Augment``
        spec (``cnnkit.data.augment``), or None."""
        return None

    def val_extras(self, val: dict, classes: list[str], balance: Balance) -> dict:
        """Extra metrics.csv fields from a validation summary (e.g. per-class recall)."""
        return {}

    def predict(self, outputs: torch.Tensor, classes: list[str], top_k: int) -> list:
        """Model outputs (B, ...) as one prediction per image."""
        raise NotImplementedError

    def summarize(self, raw: dict, classes: list[str]) -> dict:
        """A JSON-able evaluation result from a ``Metrics.summary`` (``cnnkit eval``, the
        test_metrics.json of a run)."""
        raise NotImplementedError
