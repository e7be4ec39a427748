"""Throughput of `cnnkit doctor` on an image folder (CIFAR-10 JPEGs): cold and cached.

Cold: an empty cache folder, every file read, hashed, fully decoded and perceptually hashed in
worker processes. Cached: the same folder again, unchanged, so only file stats, the cache and the
duplicate search run. The baseline, measured in the same run, is the bare minimum a full check
costs: one process opening and decoding every file with Pillow (no hashing, no policy), so the
ratio says what the parallel workers and the cache buy on this machine. Not a test.

    python benchmarks/doctor_speed.py /tmp/cifar10    (the extracted cifar10-jpeg.tar.gz)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from PIL import Image

from cnnkit.data.doctor import scan
from cnnkit.data.host import cpu_count
from cnnkit.data.images import list_images


def bare_decode_images_per_s(root: str) -> float:
    paths = list_images(root)
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as img:
            img.load()
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="image folder (train/ and test/ of class folders)")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {cpu_count()} usable cores")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CNNKIT_CACHE_DIR"] = cache
        cold = scan(args.data, workers=args.workers)
        warm = scan(args.data, workers=args.workers)
    bare = bare_decode_images_per_s(args.data)
    for name, report in (("cold", cold), ("cached", warm)):
        rate = report.images / report.seconds
        print(
            f"doctor {name}: {report.images} images in {report.seconds:.1f}s = {rate:.0f} images/s "
            f"({rate / bare:.2f}x bare decode); {len(report.errors)} errors, "
            f"{len(report.leaks)} cross-split duplicate pairs, "
            f"{len(report.near_duplicates)} near-duplicate pairs"
        )
    print(f"baseline: bare single-process Pillow decode {bare:.0f} images/s")


if __name__ == "__main__":
    main()
