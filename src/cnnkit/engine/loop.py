"""One epoch of training and one pass of evaluation, written out explicitly.

Metrics are summed on the device and read once at the end (a ``.item()`` per step would force a
host sync per step on a GPU); the progress display reads them at most every ``REFRESH_SECONDS``.

Out of GPU memory in the middle of a run (a larger batch of images, fragmentation) does not end
it: the step is redone as 2, 4, ... micro-batches whose gradients add up to the same batch's
(gradient accumulation), and the run keeps that split from then on.

Two checks run at step boundaries. A non-finite loss is caught after backward and before the
optimizer step (one host read of a scalar per step: it waits for backward to finish, which costs
only the launch latency of the optimizer step, while checking before backward would stall the
whole backward launch): ``StepTools.nan_policy`` "stop" raises ``NonFiniteLoss``, "skip" drops the
update and counts it. ``StepTools.stop`` (a signal flag) raises ``Stopped`` before the next step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.engine import distributed
from cnnkit.engine.runtime import Runtime
from cnnkit.errors import CnnkitError
from cnnkit.tasks import Metrics

REFRESH_SECONDS = 1.0  # progress refresh interval: reading the running loss costs a device sync


@dataclass
class StepTools:
    """What a training step needs besides the model and the batch."""

    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # stepped per step; None: not
    scaler: torch.amp.GradScaler | None = None
    grad_clip: float | None = None
    mix: Callable | None = None  # (images, labels) -> (images, soft labels): MixUp/CutMix
    ema: object | None = None  # has .update(model)
    accum: int = 1  # micro-batches per step; doubled when a step runs out of GPU memory
    after_step: Callable[[int], None] | None = None  # called with the step index after each step
    note: Callable[[str], None] = print
    nan_policy: str = "stop"  # stop | skip: what a non-finite loss does
    nan_limit: int = 10  # skip: raise NonFiniteLoss once more steps than this were skipped
    skipped: int = 0  # steps skipped for a non-finite loss so far in the run
    overflow: torch.Tensor | int = 0  # steps the grad scaler skipped (summed on the device)
    stop: Callable[[], bool] | None = None  # True: end the epoch before the next step
    freeze_bn: bool = False  # batch norm keeps its running statistics (fine-tuning, small batches)
    scale: float = 1.0  # progressive resizing: batches resized to this fraction of their side


class NonFiniteLoss(Exception):
    """The loss of step ``step`` (0-based in this pass) was NaN/inf; no update was applied."""

    def __init__(self, step: int, value: float, skipped: int):
        super().__init__(f"non-finite loss {value} at step {step}")
        self.step, self.value, self.skipped = step, value, skipped


class Stopped(Exception):
    """``StepTools.stop`` asked to stop; ``steps`` steps were applied, ``totals`` holds their
    metric sums (``Metrics.sums`` as a list)."""

    def __init__(self, steps: int, totals: list[float]):
        super().__init__(f"stopped after step {steps}")
        self.steps, self.totals = steps, totals


def train_one_epoch(
    model: nn.Module,
    loader,
    tools: StepTools,
    rt: Runtime,
    metrics: Metrics,
    progress: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train for one pass over ``loader``; returns the task's ``metrics`` summary (summed over
    processes) plus images, seconds, first_step and skipped_steps."""
    model.train()
    if tools.freeze_bn:  # normalise with the stored statistics; their scale and shift still train
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    seen, start = 0, time.perf_counter()
    first_step, last_refresh = None, start
    skipped_before = tools.skipped + int(tools.overflow)  # one read per epoch, not per step
    for step, (images, labels) in enumerate(loader):
        # checked before a step, not after, so a stop during the last step ends the epoch normally
        if step and tools.stop is not None and tools.stop():
            raise Stopped(step, metrics.sums().tolist())
        images, labels = rt.to_device(images), labels.to(rt.device, non_blocking=True)
        if tools.scale != 1.0:
            images, labels = resize_batch(images, labels, tools.scale)
        loss, outputs = _train_step(model, images, labels, tools, rt, step)
        if loss is not None:  # None: skipped for a non-finite loss
            metrics.update(loss, outputs.detach(), labels)
            seen += labels.shape[0]
        if tools.after_step is not None:
            tools.after_step(step)
        now = time.perf_counter()
        if first_step is None:
            first_step = now - start  # includes compilation when the model is compiled
        if progress is not None and now - last_refresh >= REFRESH_SECONDS and seen:
            last_refresh = now
            running = metrics.summary(metrics.sums())  # a device sync, once a second at most
            progress(step + 1, {**running, "lr": tools.optimizer.param_groups[0]["lr"]})
    # sums over all processes of a distributed run (one message per epoch)
    summary = metrics.summary(distributed.sum_(metrics.sums()))
    return {
        **summary,
        "seconds": time.perf_counter() - start,
        "first_step": first_step or 0.0,
        "skipped_steps": tools.skipped + int(tools.overflow) - skipped_before,
    }


def scaled_side(side: int, scale: float) -> int:
    """``side`` x ``scale`` rounded down to a multiple of 4 (8 from 64 px up), at least 8: few
    distinct shapes, each friendly to strided convs and the kernels' caches."""
    multiple = 8 if side >= 64 else 4
    return max(8, int(side * scale + 1e-6) // multiple * multiple)


def resize_batch(images: torch.Tensor, labels: torch.Tensor, scale: float):
    """Images (B, C, H, W) resized by ``scale`` (bilinear, antialiased when shrinking); masks
    (labels (B, H, W)) with nearest, so they keep their classes. Layout kept."""
    h, w = images.shape[-2:]
    size = (scaled_side(h, scale), scaled_side(w, scale))
    if size == (h, w):
        return images, labels
    layout = (
        torch.channels_last
        if images.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    out = F.interpolate(images, size=size, mode="bilinear", antialias=scale < 1.0)
    if labels.ndim == 3:  # segmentation masks follow their images
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return out.contiguous(memory_format=layout), labels


def _train_step(model, images, labels, tools: StepTools, rt: Runtime, step: int = 0):
    """One optimizer step on the batch; on out-of-memory, retried in twice as many pieces.
    Returns (loss, logits), or (None, None) when a non-finite loss was skipped."""
    targets = labels
    if tools.mix is not None:
        images, targets = tools.mix(images, labels)
    # a NaN batch poisons batch-norm statistics in the forward pass; "skip" must undo that
    buffers = [b.clone() for b in model.buffers()] if tools.nan_policy == "skip" else None
    while True:
        try:
            loss, logits = _forward_backward(model, images, targets, tools, rt)
            break
        except torch.OutOfMemoryError:
            tools.optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if tools.accum >= images.shape[0]:
                raise CnnkitError(
                    "out of GPU memory even with one image per micro-batch; use a smaller model "
                    "or input size"
                ) from None
            tools.accum = min(tools.accum * 2, images.shape[0])
            tools.note(
                f"note: out of GPU memory at {images.shape[0]} images per step; continuing "
                f"with {tools.accum} micro-batches of ~{-(-images.shape[0] // tools.accum)} "
                "(same effective batch)"
            )
    if _non_finite(loss, tools, step):
        for saved, buffer in zip(buffers, model.buffers(), strict=True):
            buffer.copy_(saved)
        return None, None
    if tools.scaler is not None:
        tools.scaler.unscale_(tools.optimizer)
        _clip(model, tools.grad_clip)
        # found_inf has no public per-step accessor; summing it stays on the device (no sync)
        found_inf = tools.scaler._found_inf_per_device(tools.optimizer).values()
        tools.overflow = tools.overflow + sum(found_inf)
        tools.scaler.step(tools.optimizer)
        tools.scaler.update()
    else:
        _clip(model, tools.grad_clip)
        tools.optimizer.step()
    if tools.scheduler is not None:
        tools.scheduler.step()
    if tools.ema is not None:
        tools.ema.update(unwrap(model))
    return loss, logits


def _non_finite(loss: torch.Tensor, tools: StepTools, step: int) -> bool:
    """True when this step must be skipped; raises NonFiniteLoss when it must stop the run."""
    if bool(loss.detach().isfinite()):  # the one per-step host sync (see the module docstring)
        return False
    tools.optimizer.zero_grad(set_to_none=True)
    if tools.nan_policy == "skip" and tools.skipped < tools.nan_limit:
        tools.skipped += 1
        return True
    raise NonFiniteLoss(step, loss.item(), tools.skipped)


def _forward_backward(model, images, targets, tools: StepTools, rt: Runtime):
    """Gradients of the batch's mean loss, in ``tools.accum`` micro-batches; (loss, logits)."""
    tools.optimizer.zero_grad(set_to_none=True)
    if tools.accum == 1:
        with rt.autocast():
            logits = model(images)  # (B, num_classes) for classification
            loss = tools.loss_fn(logits.float(), targets)
        _backward(loss, tools)
        return loss, logits
    total = images.shape[0]
    losses, all_logits = [], []
    for part, part_targets in zip(
        images.chunk(tools.accum), targets.chunk(tools.accum), strict=True
    ):
        with rt.autocast():
            logits = model(part)
            loss = tools.loss_fn(logits.float(), part_targets) * (part.shape[0] / total)
        _backward(loss, tools)
        losses.append(loss.detach())
        all_logits.append(logits.detach())
    return torch.stack(losses).sum(), torch.cat(all_logits)


def _backward(loss: torch.Tensor, tools: StepTools) -> None:
    if tools.scaler is not None:
        tools.scaler.scale(loss).backward()
    else:
        loss.backward()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel and torch.compile wrappers (whose state
    dict keys carry ``module.`` / ``_orig_mod.`` prefixes)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _clip(model: nn.Module, max_norm: float | None) -> None:
    if max_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, rt: Runtime, metrics: Metrics, loss_fn: nn.Module) -> dict:
    """One pass over ``loader`` without gradients; the task's ``metrics`` summary (this process's
    data only: validation reads the whole split in every process)."""
    model.eval()
    for images, labels in loader:
        images, labels = rt.to_device(images), labels.to(rt.device, non_blocking=True)
        with rt.autocast():
            outputs = model(images).float()
        metrics.update(loss_fn(outputs, labels), outputs, labels)
    return metrics.summary(metrics.sums())
