"""``batch_size: auto``: pick the batch size for this machine and model by trying it.

On CUDA: the largest power of two whose training step fits in GPU memory with a margin (peak
memory at most ``GPU_MEMORY_MARGIN`` of the card); if a later step still runs out of memory the
loop splits it into micro-batches (see ``cnnkit.engine.loop``). On a CPU memory is rarely the
limit, throughput is: each power of two is timed for a few steps and the smallest size within
``CPU_WITHIN`` of the best images/s wins (smaller batches generalise better per epoch).

Trials run on a copy of the model with random inputs of the run's shape, precision and memory
layout; the model itself is untouched. Sizes stay at most 1/8 of the training split, so an epoch
has at least 8 steps.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from cnnkit.engine.runtime import Runtime
from cnnkit.errors import CnnkitError

SMALLEST = 16
CPU_LARGEST = 512
GPU_LARGEST = 4096
GPU_MEMORY_MARGIN = 0.8  # share of the card's memory a trial step may peak at
CPU_WITHIN = 0.05  # the smallest size within 5% of the best images/s wins
CPU_TRIAL_SECONDS = 0.4  # per size, after one warm-up step


def auto_batch_size(
    model: nn.Module,
    rt: Runtime,
    input_shape: tuple[int, int, int],
    num_classes: int,
    train_size: int,
    note: Callable[[str], None] = print,
) -> int:
    """The batch size to train ``model`` with on ``rt``'s device (see the module docstring)."""
    largest = GPU_LARGEST if rt.device.type == "cuda" else CPU_LARGEST
    sizes = [s for s in _powers_of_two(SMALLEST, largest) if s <= max(train_size // 8, SMALLEST)]
    trial = _Trial(model, rt, input_shape, num_classes)
    if rt.device.type == "cuda":
        chosen, report = _largest_fitting(trial, sizes, rt.device)
    else:
        chosen, report = _fastest(trial, sizes)
    note(f"batch size auto: {chosen} ({report})")
    return chosen


class _Trial:
    """Training steps of a throwaway copy of the model on random data."""

    def __init__(self, model: nn.Module, rt: Runtime, input_shape, num_classes: int) -> None:
        self.model = copy.deepcopy(model).to(rt.device, memory_format=rt.memory_format).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-6, momentum=0.9)
        self.rt, self.input_shape, self.num_classes = rt, input_shape, num_classes

    def step(self, batch_size: int, steps: int = 1) -> float:
        """Seconds for ``steps`` training steps at ``batch_size`` (device-synchronised)."""
        images = self.rt.to_device(torch.randn(batch_size, *self.input_shape))
        labels = torch.randint(self.num_classes, (batch_size,), device=self.rt.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            with self.rt.autocast():
                loss = nn.functional.cross_entropy(self.model(images).float(), labels)
            loss.backward()
            self.optimizer.step()
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize(self.rt.device)
        return time.perf_counter() - start


def _fastest(trial: _Trial, sizes: list[int]) -> tuple[int, str]:
    rates: dict[int, float] = {}
    for size in sizes:
        trial.step(size)  # warm-up: allocations, oneDNN primitive creation
        steps, seconds = 0, 0.0
        while seconds < CPU_TRIAL_SECONDS or steps < 2:
            seconds += trial.step(size)
            steps += 1
        rates[size] = size * steps / seconds
        if len(rates) >= 3 and rates[size] < 0.9 * max(rates.values()):
            break  # past the peak
    best = max(rates.values())
    chosen = min(s for s, r in rates.items() if r >= (1 - CPU_WITHIN) * best)
    report = ", ".join(f"{s}: {r:.0f} img/s" for s, r in rates.items())
    return chosen, report


def _largest_fitting(trial: _Trial, sizes: list[int], device: torch.device) -> tuple[int, str]:
    total = torch.cuda.get_device_properties(device).total_memory
    fitting: dict[int, float] = {}
    for size in sizes:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            trial.step(size, steps=2)
        except torch.OutOfMemoryError:
            break
        peak = torch.cuda.max_memory_allocated(device) / total
        if peak > GPU_MEMORY_MARGIN:
            break
        fitting[size] = peak
    trial.optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    if not fitting:
        raise CnnkitError(
            f"batch size auto: even {sizes[0]} images per step do not fit in GPU memory; use a "
            "smaller model or input size"
        )
    chosen = max(fitting)
    return chosen, f"peak GPU memory {fitting[chosen]:.0%} of {total / 2**30:.0f} GiB"


def _powers_of_two(low: int, high: int) -> list[int]:
    sizes, size = [], low
    while size <= high:
        sizes.append(size)
        size *= 2
    return sizes
