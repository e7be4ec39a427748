"""Pieces shared by the benchmark scripts: the machine line and the textbook CIFAR pipeline."""

from __future__ import annotations

import os
import platform

import torch
import torchvision
from torchvision.transforms import v2

from cnnkit.engine import runtime


def machine() -> str:
    """CPU model, cores, torch threads, GPU, native bf16 and versions, on one line."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads, {gpu}, "
        f"native CPU bf16: {runtime.cpu_has_native_bf16()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}"
    )


def textbook_cifar_transform() -> v2.Compose:
    """Per-sample train transform of the usual tutorial: pad-4 crop, flip, to float, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),
        ]
    )
