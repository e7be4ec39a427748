"""The task seam: a second task plugs into ``fit`` without edits to the engine.

The smallest such task is written here: two classes per pixel (a bright square on noise), with
its own loss, metrics summed on the device and metrics.csv fields. It trains through
``cnnkit.engine.fit.fit`` unchanged, on data made on the fly."""

from __future__ import annotations

import csv
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from cnnkit import tasks
from cnnkit.config import Config
from cnnkit.engine import runtime
from cnnkit.engine.fit import fit
from cnnkit.tasks import Metrics, Task

SIDE = 16


class Squares(Dataset):
    """Noise images (1, 16, 16) with a bright square; the target is the square's mask."""

    def __init__(self, count: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(count, 1, SIDE, SIDE, generator=g) * 0.6
        self.targets = torch.zeros(count, SIDE, SIDE, dtype=torch.long)
        for i in range(count):
            y, x = torch.randint(0, SIDE - 6, (2,), generator=g).tolist()
            size = int(torch.randint(3, 7, (1,), generator=g))
            self.images[i, 0, y : y + size, x : x + size] += 0.5
            self.targets[i, y : y + size, x : x + size] = 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


class PixelMetrics(Metrics):
    def __init__(self, device: torch.device) -> None:
        self._sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss*n, right, px, n

    def update(self, loss, outputs, targets) -> None:
        n = targets.shape[0]
        self._sums += torch.stack(
            [
                loss.detach().double() * n,
                (outputs.argmax(1) == targets).sum().double(),
                torch.tensor(targets.numel(), device=targets.device, dtype=torch.float64),
                torch.tensor(n, device=targets.device, dtype=torch.float64),
            ]
        )

    def sums(self) -> torch.Tensor:
        return self._sums

    def summary(self, sums: torch.Tensor) -> dict:
        loss_sum, right, pixels, images = sums.tolist()
        return {
            "loss": loss_sum / max(images, 1),
            "pixel_acc": right / max(pixels, 1),
            "images": int(images),
        }


class Pixels(Task):
    name = "pixels"
    target = "mask of class indices"
    train_fields = ("loss", "pixel_acc")
    val_fields = ("loss", "pixel_acc")
    shown = ("train_loss", "val_pixel_acc")

    def loss(self, label_smoothing, class_weights) -> nn.Module:
        return nn.CrossEntropyLoss()  # over (B, 2, H, W) logits and (B, H, W) masks

    def metrics(self, num_classes, device, train) -> Metrics:
        return PixelMetrics(device)

    def predict(self, outputs, classes, top_k) -> list:
        return list(outputs.argmax(1))


@dataclass
class ToySplits:
    train: Dataset
    val: Dataset
    classes: tuple = ("background", "square")
    name: str = "squares"
    preprocessing: dict | None = None
    augment: dict | None = None
    fingerprint: str = "toy"


def test_a_second_task_trains_through_fit_unchanged(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1)
    )
    cfg = Config()
    cfg.data.batch_size, cfg.data.decode_cache, cfg.data.num_workers = 16, "off", 0
    cfg.train.epochs, cfg.train.monitor, cfg.train.progress = 6, "val_loss", "plain"
    cfg.optim.lr, cfg.runtime.precision = 0.2, "fp32"
    rt = runtime.resolve(cfg.runtime)
    splits = ToySplits(Squares(256, seed=0), Squares(64, seed=1))

    result = fit(model, splits, cfg, tmp_path, {"arch": "toy"}, rt, Pixels())

    last = result.history[-1]
    assert last["val_pixel_acc"] >= 0.97, last  # squares are learnt per pixel
    assert last["val_loss"] < result.history[0]["val_loss"]
    with open(tmp_path / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert header[:5] == ["epoch", "train_loss", "train_pixel_acc", "val_loss", "val_pixel_acc"]
    assert "val_pixel_acc" in capsys.readouterr().out  # the task's fields in the progress line
    assert (tmp_path / "model.safetensors").is_file()


def test_classification_is_the_registered_task():
    assert tasks.get("classification").target == "class index"
    assert set(tasks.TASKS) == {"classification", "segmentation"}
