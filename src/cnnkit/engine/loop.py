"""One epoch of training and one pass of evaluation, written out explicitly.

Metrics are summed on the device and read once at the end (a ``.item()`` per step would force a
host sync per step on a GPU); the progress display reads them only every ``REFRESH_STEPS`` steps.

Two checks run at step boundaries. A non-finite loss is caught after backward and before the
optimizer step (one host read of a scalar per step: it waits for backward to finish, which costs
only the launch latency of the optimizer step, while checking before backward would stall the
whole backward launch): ``StepTools.nan_policy`` "stop" raises ``NonFiniteLoss``, "skip" drops the
update and counts it. ``StepTools.stop`` (a signal flag) raises ``Stopped`` after a completed step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnkit.engine.runtime import Runtime

REFRESH_STEPS = 10  # progress refresh interval: reading the running loss costs a device sync


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
    nan_policy: str = "stop"  # stop | skip: what a non-finite loss does
    nan_limit: int = 10  # skip: raise NonFiniteLoss once more steps than this were skipped
    skipped: int = 0  # steps skipped for a non-finite loss so far in the run
    stop: Callable[[], bool] | None = None  # True: end the epoch after the current step


class NonFiniteLoss(Exception):
    """The loss of step ``step`` (0-based in this pass) was NaN/inf; no update was applied."""

    def __init__(self, step: int, value: float, skipped: int):
        super().__init__(f"non-finite loss {value} at step {step}")
        self.step, self.value, self.skipped = step, value, skipped


class Stopped(Exception):
    """``StepTools.stop`` asked to stop; ``steps`` steps were applied, ``totals`` sums them."""

    def __init__(self, steps: int, totals: dict):
        super().__init__(f"stopped after step {steps}")
        self.steps, self.totals = steps, totals


def train_one_epoch(
    model: nn.Module,
    loader,
    tools: StepTools,
    rt: Runtime,
    progress: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train for one pass over ``loader``; returns loss, acc, images, seconds."""
    model.train()
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    seen, start = 0, time.perf_counter()
    skipped = torch.zeros((), device=rt.device)  # steps the grad scaler skipped (overflow)
    nan_skipped_before = tools.skipped
    for step, (images, labels) in enumerate(loader):
        # checked before a step, not after, so a stop during the last step ends the epoch normally
        if step and tools.stop is not None and tools.stop():
            totals = {"loss_sum": loss_sum.item(), "correct": correct.item(), "seen": seen}
            raise Stopped(step, totals)
        images, labels = rt.to_device(images), labels.to(rt.device, non_blocking=True)
        loss, logits, scaler_skip = _train_step(model, images, labels, tools, rt, step)
        if loss is not None:
            loss_sum += loss.detach() * labels.shape[0]
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += labels.shape[0]
            skipped += scaler_skip
        if progress is not None and (step + 1) % REFRESH_STEPS == 0:
            progress(
                step + 1,
                {
                    "loss": loss_sum.item() / seen,
                    "acc": correct.item() / seen,
                    "images": seen,
                    "lr": tools.optimizer.param_groups[0]["lr"],
                },
            )
    seconds = time.perf_counter() - start
    seen = max(seen, 1)
    return {
        "loss": loss_sum.item() / seen,
        "acc": correct.item() / seen,
        "images": seen,
        "seconds": seconds,
        "skipped_steps": int(skipped.item()) + tools.skipped - nan_skipped_before,
    }


def _train_step(model, images, labels, tools: StepTools, rt: Runtime, step: int):
    """One update; (loss, logits, scaler-skipped 0/1 tensor), or Nones when it was skipped."""
    targets = labels
    if tools.mix is not None:
        images, targets = tools.mix(images, labels)
    # a NaN batch poisons batch-norm statistics in the forward pass; "skip" must undo that
    buffers = [b.clone() for b in model.buffers()] if tools.nan_policy == "skip" else None
    with rt.autocast():
        logits = model(images)  # (B, num_classes)
        loss = tools.loss_fn(logits.float(), targets)
    tools.optimizer.zero_grad(set_to_none=True)
    (tools.scaler.scale(loss) if tools.scaler is not None else loss).backward()
    if _non_finite(loss, tools, step):
        for saved, buffer in zip(buffers, model.buffers(), strict=True):
            buffer.copy_(saved)
        return None, None, 0
    scaler_skip = 0
    if tools.scaler is not None:
        tools.scaler.unscale_(tools.optimizer)
        _clip(model, tools.grad_clip)
        # found_inf has no public per-step accessor; summing it stays on the device (no sync)
        scaler_skip = sum(tools.scaler._found_inf_per_device(tools.optimizer).values())
        tools.scaler.step(tools.optimizer)
        tools.scaler.update()
    else:
        _clip(model, tools.grad_clip)
        tools.optimizer.step()
    if tools.scheduler is not None:
        tools.scheduler.step()
    if tools.ema is not None:
        tools.ema.update(model)
    return loss, logits, scaler_skip


def _non_finite(loss: torch.Tensor, tools: StepTools, step: int) -> bool:
    """True when this step must be skipped; raises NonFiniteLoss when it must stop the run."""
    if bool(loss.detach().isfinite()):  # the one per-step host sync (see the module docstring)
        return False
    tools.optimizer.zero_grad(set_to_none=True)
    if tools.nan_policy == "skip" and tools.skipped < tools.nan_limit:
        tools.skipped += 1
        return True
    raise NonFiniteLoss(step, loss.item(), tools.skipped)


def _clip(model: nn.Module, max_norm: float | None) -> None:
    if max_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader, rt: Runtime, num_classes: int, loss_fn: nn.Module | None = None
) -> dict:
    """Loss, top-1, top-5 and the confusion matrix (rows: true class, columns: predicted)."""
    model.eval()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    loss_sum = torch.zeros((), device=rt.device)
    top5 = torch.zeros((), device=rt.device, dtype=torch.long)
    confusion = torch.zeros(num_classes * num_classes, device=rt.device, dtype=torch.long)
    seen = 0
    k = min(5, num_classes)
    for images, labels in loader:
        images, labels = rt.to_device(images), labels.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(images).float()
        loss_sum += loss_fn(logits, labels) * labels.shape[0]
        top5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum()
        confusion += torch.bincount(
            labels * num_classes + logits.argmax(1), minlength=num_classes * num_classes
        )
        seen += labels.shape[0]
    confusion = confusion.view(num_classes, num_classes).cpu()
    seen = max(seen, 1)
    return {
        "loss": loss_sum.item() / seen,
        "acc": confusion.diag().sum().item() / seen,
        "acc5": top5.item() / seen,
        "images": seen,
        "confusion": confusion,
    }
