"""Membrane segmentation (ISBI 2012 EM, 30 images 512x512): `cnnkit train` against a hand-written
U-Net loop of the same size at the same resolution, on the same 25/5 split.

    python benchmarks/segmentation.py                  # extracts ../shared/data/membrane.tar.gz
    python benchmarks/segmentation.py --epochs 40 --set data.rotate=10

Five images (the last five by number) are held out as the test split; cnnkit carves its
validation images from the other 25 (data.val_fraction). cnnkit trains with no flags (its own
choices: unet_small, 16-32-64-128, at 256 px on a CPU) unless --model/--epochs/--input-size/--set
say otherwise, and is scored on the five held-out images at its training side and, through
`cnnkit predict`'s masks, at their own 512 px: membrane-class IoU and Dice (class 0: membrane,
22% of pixels) and pixel accuracy. The hand loop (~100 lines below: the same U-Net, Adam,
cross-entropy, flips, batch 4, at cnnkit's side) trains until it reaches the IoU cnnkit reached,
or for --hand-max-s seconds, scoring the test images after every epoch; its time to that IoU is
the comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "membrane.tar.gz"
HELD_OUT = 5
NEAR = 0.01  # the hand loop's time to within this of cnnkit's IoU is printed too


def prepare(root: Path) -> Path:
    """/tmp/membrane/membrane from the archive; a split copy: train/ (25) and test/ (5)."""
    source = root / "membrane"
    if not source.is_dir():
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(root, filter="data")
    split = root / "bench_split"
    stems = sorted((p.stem for p in (source / "image").glob("*.png")), key=int)
    if not split.is_dir():
        for i, stem in enumerate(stems):
            part = "test" if i >= len(stems) - HELD_OUT else "train"
            for folder in ("image", "label"):
                (split / part / folder).mkdir(parents=True, exist_ok=True)
                shutil.copy(source / folder / f"{stem}.png", split / part / folder)
        shutil.copy(source / "classes.txt", split) if (source / "classes.txt").exists() else None
    return split


def run_cnnkit(split: Path, args) -> dict:
    """`cnnkit train` on the split (no flags unless given); its test scores, the side it
    trained at, its last training pixel accuracy and the wall time of the whole command."""
    out = Path("/tmp/membrane/bench_runs")
    flags = {"--model": args.model, "--epochs": args.epochs, "--input-size": args.input_size}
    given = [x for flag, value in flags.items() if value is not None for x in (flag, str(value))]
    name = f"m{int(time.time())}"
    command = [
        sys.executable, "-m", "cnnkit", "train", str(split), *given,
        "--name", name, f"train.out_dir={out}", "train.progress=plain",
        *args.set,
    ]  # fmt: skip
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    print("\n".join(done.stdout.splitlines()[:4]), "\n...\n", done.stdout[-900:], flush=True)
    run = out / name
    scores = json.loads((run / "test_metrics.json").read_text())
    side = yaml.safe_load((run / "config.yaml").read_text())["data"]["input_size"]
    with open(run / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    return {
        "scores": scores, "wall": wall, "run": run, "side": side,
        "train_pixel_acc": float(last["train_pixel_acc"]),
    }  # fmt: skip


def native_scores(run: Path, split: Path) -> dict:
    """The held-out images scored at their own 512x512, as `cnnkit predict` writes their masks
    (probabilities resized to the image, then argmax), against the original label PNGs."""
    from cnnkit.deploy.predictor import predict

    images = sorted((split / "test" / "image").glob("*.png"))
    found = predict(run, [str(p) for p in images], mask_dir=run / "native_masks")
    pred, truth = [], []
    for path, result in zip(images, found, strict=True):
        pred.append(np.asarray(Image.open(result["mask"])))
        truth.append((np.asarray(Image.open(split / "test" / "label" / path.name)) > 127) * 1)
    return membrane_counts(torch.from_numpy(np.stack(pred)), torch.from_numpy(np.stack(truth)))


# --- the hand-written loop -----------------------------------------------------------------


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
    )  # fmt: skip


class HandUNet(nn.Module):
    """16-32-64-128, max-pool down, transposed conv up, skips: unet_small's shape."""

    def __init__(self, widths=(16, 32, 64, 128), classes: int = 2) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        cin = 1
        for w in widths:
            self.down.append(block(cin, w))
            cin = w
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(len(widths) - 1))
        )
        self.dec = nn.ModuleList(block(2 * widths[i], widths[i]) for i in reversed(range(3)))
        self.out = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, stage in enumerate(self.down):
            x = stage(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1]), strict=True):
            x = dec(torch.cat([up(x), skip], 1))
        return self.out(x)


def load(split: Path, part: str, side: int):
    images, masks = [], []
    for path in sorted((split / part / "image").glob("*.png")):
        image = Image.open(path).convert("L").resize((side, side), Image.BILINEAR)
        mask = Image.open(split / part / "label" / path.name).resize((side, side), Image.NEAREST)
        images.append(np.asarray(image, np.float32) / 255.0)
        masks.append((np.asarray(mask) > 127).astype(np.int64))  # 1: cell, 0: membrane
    x = torch.from_numpy(np.stack(images))[:, None]
    return (x - x.mean()) / x.std(), torch.from_numpy(np.stack(masks))


def membrane_scores(model, x, y) -> dict:
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    model.train()
    return membrane_counts(pred, y)


def membrane_counts(pred: torch.Tensor, y: torch.Tensor) -> dict:
    """Membrane (class 0) IoU and Dice, and pixel accuracy, of class maps against truth."""
    tp = ((pred == 0) & (y == 0)).sum().item()
    fp = ((pred == 0) & (y == 1)).sum().item()
    fn = ((pred == 1) & (y == 0)).sum().item()
    return {
        "iou": tp / max(tp + fp + fn, 1),
        "dice": 2 * tp / max(2 * tp + fp + fn, 1),
        "pixel_acc": (pred == y).float().mean().item(),
    }


def run_hand(split: Path, side: int, target_iou: float, max_s: float) -> dict:
    torch.manual_seed(0)
    x, y = load(split, "train", side)
    tx, ty = load(split, "test", side)
    model = HandUNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start, epoch, reached, near, best = time.perf_counter(), 0, None, None, {"iou": 0.0}
    while time.perf_counter() - start < max_s:
        epoch += 1
        order = torch.randperm(len(x))
        for i in range(0, len(x) - 3, 4):
            xb, yb = x[order[i : i + 4]], y[order[i : i + 4]]
            if torch.rand(()) < 0.5:
                xb, yb = xb.flip(3), yb.flip(2)
            if torch.rand(()) < 0.5:
                xb, yb = xb.flip(2), yb.flip(1)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        scores = membrane_scores(model, tx, ty)
        best = max(best, scores, key=lambda s: s["iou"])
        print(f"hand epoch {epoch}: {scores} at {time.perf_counter() - start:.0f}s", flush=True)
        if near is None and scores["iou"] >= target_iou - NEAR:
            near = time.perf_counter() - start
        if scores["iou"] >= target_iou:
            reached = time.perf_counter() - start
            break
    wall = time.perf_counter() - start
    return {"best": best, "reached_s": reached, "near_s": near, "epochs": epoch, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/membrane")
    parser.add_argument("--model", default=None, help="default: cnnkit's choice (model auto)")
    parser.add_argument("--epochs", type=int, default=None, help="default: cnnkit's")
    parser.add_argument("--input-size", type=int, default=None, help="default: cnnkit's")
    parser.add_argument("--hand-max-s", type=float, default=900.0)
    parser.add_argument("--set", nargs="*", default=[], help="extra cnnkit key=value overrides")
    args = parser.parse_args()
    print("machine:", machine(), flush=True)
    split = prepare(Path(args.root))
    ours = run_cnnkit(split, args)
    test = ours["scores"]
    membrane = test["per_class"][0]  # class 0: the membrane
    iou, dice = membrane["iou"], membrane["dice"]
    print(
        f"cnnkit: membrane IoU {iou:.3f}, Dice {dice:.3f}, pixel accuracy "
        f"{test['pixel_acc']:.3f}, mIoU {test['miou']:.3f} at {ours['side']} px; "
        f"{ours['wall']:.0f} s wall ({ours['run']})",
        flush=True,
    )
    native = native_scores(ours["run"], split)
    print(
        f"cnnkit at the images' own 512 px (predict's masks): membrane IoU {native['iou']:.3f}, "
        f"Dice {native['dice']:.3f}, pixel accuracy {native['pixel_acc']:.3f}; last epoch's "
        f"training pixel accuracy {ours['train_pixel_acc']:.3f} (augmented training batches: "
        f"the kind of figure the Keras tutorial's 0.97 is)",
        flush=True,
    )
    hand = run_hand(split, ours["side"], iou, args.hand_max_s)
    b = hand["best"]
    when = f"{hand['reached_s']:.0f} s" if hand["reached_s"] else f"not in {hand['wall']:.0f} s"
    print(
        f"hand loop: best membrane IoU {b['iou']:.3f}, Dice {b['dice']:.3f}, pixel accuracy "
        f"{b['pixel_acc']:.3f} ({hand['epochs']} epochs); cnnkit's IoU {iou:.3f} reached: {when}"
    )
    near = f"{hand['near_s']:.0f} s" if hand["near_s"] else "never"
    print(f"cnnkit wall / hand time to the same IoU: {ours['wall']:.0f} s / {when}")
    print(f"hand time to within {NEAR} of cnnkit's IoU ({iou - NEAR:.3f}): {near}")


if __name__ == "__main__":
    main()
