"""Data-path speed: cnnkit's decode-once cache + batched augmentation vs torchvision's pipeline.

On an image folder (CIFAR-10 JPEGs: extract ../shared/data/cifar10-jpeg.tar.gz), one epoch of
training batches (random crop with 4 px padding, horizontal flip, normalise) is produced and
thrown away, no model, by:
  * baseline: torchvision ImageFolder + transforms v2 + DataLoader with the machine's worker
    count, shuffled (the usual tutorial pipeline);
  * cnnkit cold: an empty cache folder - listing, decoding every file once in parallel into the
    cache, then the epoch from memory;
  * cnnkit warm: the same again, the decoded file now read back from the cache.
Images/s count the whole time from an empty process state to the last batch, including listing
and worker start-up for the baseline and listing + decoding/reading for cnnkit. Targets: warm
>= 10x the baseline, cold >= 2x. Not a test: run it by hand, e.g.

    python benchmarks/data.py --data /tmp/cifar10 --batch-size 512
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from common import textbook_cifar_transform

from cnnkit.config import DataConfig
from cnnkit.data import build
from cnnkit.data.memory import MemoryLoader, run_loader


def torchvision_epoch(root: Path, batch_size: int, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    transform = textbook_cifar_transform()
    dataset = torchvision.datasets.ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True
    )
    seen = 0
    for x, _ in loader:
        seen += x.shape[0]
    return time.perf_counter() - start, seen


def cnnkit_epoch(
    root: Path, batch_size: int, cache_dir: str, check_files: bool
) -> tuple[float, float, int]:
    """(total seconds, seconds of the epoch alone, images)."""
    start = time.perf_counter()
    cfg = DataConfig(
        source=str(root),
        val_fraction=0.0,
        cache_dir=cache_dir,
        hflip=0.5,
        pad_crop=4,
        check_files=check_files,
    )
    splits = build(cfg, seed=0, note=lambda m: print(f"    {m}"))
    loader = run_loader(
        splits.train,
        splits.preprocessing,
        splits.augment,
        cfg,
        batch_size,
        train=True,
        seed=0,
        device=torch.device("cpu"),
        memory_format=torch.channels_last,
        note=lambda m: print(f"    {m}"),
    )
    assert isinstance(loader, MemoryLoader), "the split did not fit the decode budget"
    epoch_start, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += x.shape[0]
    end = time.perf_counter()
    return end - start, end - epoch_start, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="folder with train/<class>/*.jpg")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=None, help="baseline DataLoader workers")
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="data.check_files=false (only data that streams has a separate pre-flight check; "
        "a split decoded once is checked by that decode)",
    )
    args = parser.parse_args()
    root = Path(args.data) / "train" if (Path(args.data) / "train").is_dir() else Path(args.data)
    workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
    print(
        f"machine: {os.cpu_count()} logical cores, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}; data {root}; batch {args.batch_size}; baseline workers "
        f"{workers}; augmentation: random crop (pad 4) + flip + normalise"
    )
    base_s, base_n = torchvision_epoch(root, args.batch_size, workers)
    base = base_n / base_s
    print(
        f"torchvision ImageFolder+DataLoader: {base_n} images in {base_s:.1f} s = {base:.0f} img/s"
    )
    os.environ["CNNKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="cnnkit-bench-doctor-")  # cold check
    print(f"pre-flight integrity check (data.check_files): {not args.no_check}")
    with tempfile.TemporaryDirectory() as cache:
        cold_s, cold_epoch, n = cnnkit_epoch(root, args.batch_size, cache, not args.no_check)
        print(
            f"cnnkit cold (decode once + epoch): {n} images in {cold_s:.2f} s = {n / cold_s:.0f} "
            f"img/s ({n / cold_s / base:.1f}x baseline); the epoch alone {n / cold_epoch:.0f} img/s"
        )
        warm_s, warm_epoch, n = cnnkit_epoch(root, args.batch_size, cache, not args.no_check)
        print(
            f"cnnkit warm (cache read + epoch): {n} images in {warm_s:.2f} s = {n / warm_s:.0f} "
            f"img/s ({n / warm_s / base:.1f}x baseline); the epoch alone {n / warm_epoch:.0f} "
            f"img/s ({n / warm_epoch / base:.1f}x baseline)"
        )


if __name__ == "__main__":
    main()
