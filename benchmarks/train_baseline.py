"""Baseline training speed and accuracy of `cnnkit train` on an image folder (CIFAR-10 JPEGs).

Prints the machine, versions and settings, cnnkit's per-epoch time, images/s and final test
accuracy, and the images/s of a plain PyTorch loop (torchvision ImageFolder + the same model,
optimizer and batch size, NCHW fp32) measured in the same run, as a ratio. This is the figure the
"fast by default" work is measured against. Not a test: run it by hand.

    python benchmarks/train_baseline.py --data /tmp/cifar10 --epochs 3
    (extract ../shared/data/cifar10-jpeg.tar.gz to /tmp/cifar10 first)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torchvision
from common import machine, textbook_cifar_transform

import cnnkit


def plain_loop_images_per_s(data: str, model_name: str, batch_size: int, steps: int) -> float:
    """Images/s of the textbook loop: ImageFolder, per-sample transforms, 2 workers, fp32 NCHW."""
    tf = textbook_cifar_transform()
    dataset = torchvision.datasets.ImageFolder(os.path.join(data, "train"), transform=tf)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=2, drop_last=True
    )
    model = cnnkit.create_model(model_name, num_classes=len(dataset.classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model.train()
    start, seen = None, 0
    for step, (x, y) in enumerate(loader):
        if step == 3:  # skip worker start-up and first-call overheads
            start, seen = time.perf_counter(), 0
        loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += y.shape[0]
        if step == steps + 3:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/cifar10", help="folder with train/ and test/")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--baseline-steps", type=int, default=40)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(
        f"settings: model {args.model}, epochs {args.epochs}, batch {args.batch_size}, "
        f"data {args.data}"
    )
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = cnnkit.train(
            args.data,
            model=args.model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            out_dir=out,
            progress="plain",
        )
        wall = time.perf_counter() - t0
    rows = result.fit.history
    for row in rows:
        print(
            f"cnnkit epoch {row['epoch']}: {row['epoch_time']:.1f} s train, "
            f"{row['images_per_s']:.0f} img/s, val_acc {row['val_acc']:.4f}"
        )
    cnnkit_ips = sum(r["images_per_s"] for r in rows) / len(rows)
    print(
        f"cnnkit: {result.test_split} acc {result.test['acc']:.4f} after {len(rows)} epochs, "
        f"wall {wall:.0f} s (data scan, training, validation, final test)"
    )
    plain = plain_loop_images_per_s(args.data, args.model, args.batch_size, args.baseline_steps)
    print(f"plain PyTorch loop: {plain:.0f} img/s")
    print(f"ratio cnnkit/plain train images/s: {cnnkit_ips / plain:.2f}x")


if __name__ == "__main__":
    main()
