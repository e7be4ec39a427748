"""Time to accuracy on CIFAR-10 given as a folder: the speedrun recipe against the default one.

For each recipe and seed it runs ``cnnkit.train`` end to end and prints the final test accuracy
(with the recipe's test-time augmentation), the wall time, the training time (sum of the epochs'
train passes) and the one-time costs apart: data scan/decode before training, the whitening
init (``init_from_data``), the final evaluation; then the mean and spread over ``--seeds``.
It also prints the networks' training FLOPs per image (``torch.utils.flop_counter``), the
achieved GFLOP/s and the machine's measured fp32 matmul peak, and the speedrun/default ratios.
Not a test: run it by hand, e.g.

    python benchmarks/cifar10.py --data /tmp/cifar10-lead --recipes speedrun --seeds 1
    python benchmarks/cifar10.py --data /tmp/cifar10-lead --recipes speedrun,default --seeds 3

(``/tmp/cifar10-lead`` holds train/<class>/*.jpg and test/<class>/*.jpg, extracted from
../shared/data/cifar10-jpeg.tar.gz.) ``--epochs`` and ``--widths`` shrink the run for a slow CPU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import cnnkit
from cnnkit.config import resolve as resolve_config
from cnnkit.engine.runtime import cpu_has_native_bf16


def machine() -> str:
    cpu = "unknown cpu"
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in info.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, native bf16 {cpu_has_native_bf16()}, "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, cuda {torch.cuda.is_available()}"
    )


def matmul_peak_gflops(size: int = 2048, seconds: float = 2.0) -> float:
    """fp32 GFLOP/s of a large square matmul: the machine's practical peak right now."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def train_gflop_per_image(cfg) -> float:
    """Forward + backward FLOPs of one training image for the config's model (batch 8)."""
    model = cnnkit.create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs)
    x = torch.randn(8, 3, 32, 32)
    if hasattr(model, "init_from_data"):
        model.init_from_data(x)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 8 / 1e9


def overrides_for(recipe: str, args) -> list[str]:
    items = [f"train.epochs={args.epochs}"] if args.epochs else []
    if args.widths and recipe == "speedrun":
        items.append(f"model.kwargs={{widths: [{args.widths}]}}")
    return items


def run_once(data: str, recipe: str, seed: int, overrides: list[str], out: str) -> dict:
    start = time.perf_counter()
    result = cnnkit.train(
        data, recipe=recipe, seed=seed, overrides=overrides, out_dir=out, progress="plain"
    )
    wall = time.perf_counter() - start
    rows, timings = result.fit.history, result.fit.timings
    train_s = sum(r["epoch_time"] for r in rows)
    images = sum(r["images_per_s"] * r["epoch_time"] for r in rows)
    init = timings.get("init_from_data", 0.0)
    final = timings.get("final_eval", 0.0)
    return {
        "acc": result.test["acc"],
        "wall": wall,
        "train": train_s,
        "images_per_s": images / max(train_s, 1e-9),
        "init": init,
        "final_eval": final,
        "other": wall - train_s - init - final,
        "epochs": len(rows),
    }


def report(recipe: str, runs: list[dict], gflop: float, peak: float) -> None:
    def stat(key: str, fmt: str) -> str:
        values = [r[key] for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{format(statistics.mean(values), fmt)} +/- {format(spread, fmt)}"

    ips = statistics.mean(r["images_per_s"] for r in runs)
    print(
        f"{recipe}: {len(runs)} seed(s), {runs[0]['epochs']} epochs: test acc {stat('acc', '.4f')}"
        f", wall {stat('wall', '.0f')} s, of which training {stat('train', '.0f')} s "
        f"({ips:.0f} img/s, {ips * gflop:.1f} GFLOP/s = {ips * gflop / peak:.0%} of the fp32 "
        f"matmul peak), whitening init "
        f"{stat('init', '.1f')} s, final eval {stat('final_eval', '.0f')} s, other (data scan/"
        f"decode, validation, checkpoints) {stat('other', '.0f')} s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/cifar10-lead", help="folder with train/ and test/")
    parser.add_argument("--recipes", default="speedrun,default", help="comma-separated")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    parser.add_argument("--widths", default=None, help="speedrun_net widths, e.g. 32,128,128")
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    peak = matmul_peak_gflops()
    print(f"machine: {machine()}")
    print(f"measured fp32 matmul peak: {peak:.0f} GFLOP/s (contended machines read low)")
    print(
        f"settings: data {args.data}, recipes {recipes}, seeds {args.seeds}, "
        f"epochs {args.epochs or 'recipe'}, speedrun widths {args.widths or 'recipe'}"
    )
    summary = {}
    for recipe in recipes:
        overrides = overrides_for(recipe, args)
        cfg = resolve_config(args.data, recipe=recipe, overrides=overrides)
        gflop = train_gflop_per_image(cfg)
        print(
            f"{recipe}: model {cfg.model.name} {cfg.model.kwargs}, batch {cfg.data.batch_size}, "
            f"{cfg.train.epochs} epochs, tta {cfg.train.tta}, {gflop:.3f} GFLOP per training "
            f"image; overrides {overrides}",
            flush=True,
        )
        runs = []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as out:
                runs.append(run_once(args.data, recipe, seed, overrides, out))
            print(f"{recipe} seed {seed}: {runs[-1]}", flush=True)
        report(recipe, runs, gflop, peak)
        summary[recipe] = runs
    if "speedrun" in summary and "default" in summary:
        fast, base = summary["speedrun"], summary["default"]
        ratio = statistics.mean(r["wall"] for r in base) / statistics.mean(r["wall"] for r in fast)
        print(f"ratio default/speedrun wall time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
