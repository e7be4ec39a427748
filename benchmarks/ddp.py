"""Images/s of one process against N processes (torchrun, DDP) on the same data and model.

Runs ``cnnkit train`` once alone and once with ``--nproc N`` (same per-process batch size, so the
N-process run steps with an N times larger global batch) and reads the training images/s of each
epoch from metrics.csv; prints the machine, the settings, the median images/s and the ratio.
On a 2-core CPU expect no gain (both processes share the cores); the point there is correctness.
On a multi-GPU machine this is the scaling figure. Not a test: run it by hand, e.g.

    python benchmarks/ddp.py --nproc 2 --data digits --model simple_cnn --epochs 5
    python benchmarks/ddp.py --nproc 8 --data /data/imagenet --model resnet50 --epochs 1
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine


def run(args, nproc: int, out: Path) -> float:
    name = f"np{nproc}"
    command = [sys.executable, "-m", "cnnkit", "train", args.data, "--model", args.model]
    command += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--quiet"]
    command += ["--name", name, f"train.out_dir={out}"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    with open(out / name / "metrics.csv") as f:
        rates = [float(row["images_per_s"]) for row in csv.DictReader(f)]
    return statistics.median(rates[1:] if len(rates) > 1 else rates)  # skip the warm-up epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--model", default="simple_cnn")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(
        f"settings: {args.model} on {args.data}, {args.epochs} epochs, batch {args.batch_size} "
        f"per process, threads per process = cores / processes"
    )
    with tempfile.TemporaryDirectory() as out:
        one = run(args, 1, Path(out))
        many = run(args, args.nproc, Path(out))
    print(f"1 process: {one:.0f} img/s; {args.nproc} processes: {many:.0f} img/s in total")
    print(f"ratio {args.nproc} vs 1: {many / one:.2f}x")


if __name__ == "__main__":
    main()
