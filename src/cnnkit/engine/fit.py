"""fit(): the outer training loop, top to bottom.

Each epoch: seed the epoch's randomness from (seed, epoch), train, validate, step the schedule,
keep the best weights in ``model.safetensors``, log a row to ``metrics.csv``, then write
``checkpoints/last.pt`` with everything needed to continue exactly from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnnkit.config import Config
from cnnkit.data.memory import run_loader
from cnnkit.data.transforms import batch_mix
from cnnkit.engine import runtime
from cnnkit.engine.callbacks import BestTracker, Ema, MetricsLog, Progress
from cnnkit.engine.checkpoint import save_checkpoint, save_model_file
from cnnkit.engine.loop import StepTools, evaluate, train_one_epoch
from cnnkit.engine.optim import EPOCH_SCHEDULERS, create_optimizer, create_scheduler
from cnnkit.errors import CnnkitError

CHECKPOINT = Path("checkpoints") / "last.pt"
MONITORS = ("val_acc", "val_loss", "train_acc", "train_loss")


@dataclass
class FitResult:
    run_dir: Path
    history: list[dict]
    best: float | None  # best value of the monitored metric
    best_epoch: int  # 1-based; 0 when no epoch ran
    epochs_done: int
    stopped_early: bool


def fit(
    model: nn.Module,
    splits,
    cfg: Config,
    run_dir: Path,
    model_meta: dict,
    *,
    resume: dict | None = None,
    stop_after: int | None = None,
) -> FitResult:
    """Train ``model`` on ``splits`` as ``cfg`` says, writing everything into ``run_dir``.

    ``model_meta`` is stored in the model file (architecture, classes, preprocessing).
    ``resume`` is a checkpoint dict to continue from; ``stop_after`` ends this call after that
    many epochs (the run can be resumed later), for time-boxed jobs.
    """
    tc = cfg.train
    _check_monitor(cfg, has_val=splits.val is not None)
    rt = runtime.resolve(cfg.runtime, tc.deterministic)
    model = model.to(rt.device, memory_format=rt.memory_format)
    num_classes = len(splits.classes)
    progress = Progress(tc.progress, tc.epochs)
    train_loader = _loader(splits, splits.train, cfg, rt, progress.message)
    has_val = splits.val is not None
    val_loader = _loader(splits, splits.val, cfg, rt, progress.message) if has_val else None

    optimizer = create_optimizer(model, cfg.optim, cfg.data.batch_size)
    scheduler = create_scheduler(optimizer, cfg.optim, tc.epochs, len(train_loader))
    per_step = cfg.optim.scheduler not in EPOCH_SCHEDULERS
    tools = StepTools(
        optimizer=optimizer,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing),
        scheduler=scheduler if per_step else None,
        scaler=rt.grad_scaler(),
        grad_clip=tc.grad_clip,
        mix=batch_mix(cfg.data, num_classes),
        ema=Ema(model, tc.ema_decay) if tc.ema else None,
        note=progress.message,
    )
    # the compiled wrapper shares the parameters; state dicts are always taken from ``model``
    train_model = torch.compile(model) if rt.compile else model
    tracker = BestTracker(tc.monitor, tc.patience)
    log = MetricsLog(run_dir, tc.tensorboard)
    start = _restore(resume, model, tools, scheduler, tracker, log) if resume else 0
    progress.message(
        f"training {model_meta['arch']} on {splits.name}: "
        f"{len(splits.train)} train / {len(splits.val) if splits.val else 0} val "
        f"images, {num_classes} classes, {rt.describe()}, epochs {start + 1}..{tc.epochs}"
    )

    try:
        for epoch in range(start, tc.epochs):
            _set_frozen(model, frozen=epoch < tc.freeze_epochs)
            torch.manual_seed(runtime.epoch_seed(tc.seed, epoch))  # dropout, MixUp draws
            train_loader.sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            progress.start_epoch(epoch, len(train_loader))
            train = train_one_epoch(train_model, train_loader, tools, rt, progress.step)
            if rt.compile and epoch == start:
                progress.message(f"compile warm-up: {train['first_step']:.1f} s (first step)")
            eval_model = tools.ema.module if tools.ema is not None else model
            val = evaluate(eval_model, val_loader, rt, num_classes) if val_loader else None
            row = _row(epoch, train, val, lr)
            if not per_step:
                scheduler.step(tracker.score(row))
            if val is None or tracker.update(row, epoch + 1):
                save_model_file(run_dir / "model.safetensors", eval_model.state_dict(), model_meta)
            log.append(row)
            progress.end_epoch(row)
            save_checkpoint(
                run_dir / CHECKPOINT, _state(epoch + 1, model, tools, scheduler, tracker, log, cfg)
            )
            if tracker.should_stop:
                progress.message(
                    f"early stop: {tc.monitor} has not improved for "
                    f"{tc.patience} epochs (best {tracker.best:.4f} at epoch "
                    f"{tracker.best_epoch})"
                )
                break
            if stop_after is not None and epoch + 1 - start >= stop_after:
                break
    finally:
        progress.close()
        log.close()
    return FitResult(
        run_dir=run_dir,
        history=log.rows,
        best=tracker.best,
        best_epoch=max(tracker.best_epoch, 0) if val_loader else len(log.rows),
        epochs_done=len(log.rows),
        stopped_early=tracker.should_stop,
    )


def _loader(splits, dataset, cfg: Config, rt: runtime.Runtime, note):
    """In-memory batches augmented on the device when the split fits, else a DataLoader."""
    train = dataset is splits.train
    return run_loader(
        dataset,
        splits.preprocessing,
        splits.augment if train else None,
        cfg.data,
        cfg.data.batch_size,
        train=train,
        seed=cfg.train.seed,
        device=rt.device,
        memory_format=rt.memory_format,
        note=note,
    )


def _check_monitor(cfg: Config, has_val: bool) -> None:
    monitor = cfg.train.monitor
    if monitor not in MONITORS:
        raise CnnkitError(
            f"train.monitor '{monitor}' is not a metric; use one of {', '.join(MONITORS)}"
        )
    needs = []
    if cfg.train.patience is not None:
        needs.append("early stopping (train.patience)")
    if cfg.optim.scheduler == "plateau":
        needs.append("the plateau scheduler")
    if not has_val and monitor.startswith("val_") and needs:
        raise CnnkitError(
            f"{needs[0]} watches {monitor} but there is no validation split; set "
            "data.val_fraction > 0, give data.val, or set train.monitor=train_loss"
        )


def _set_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze everything but the classifier head (fine-tuning's first phase), or unfreeze all."""
    head = {id(p) for p in model.get_classifier().parameters()}
    for p in model.parameters():
        p.requires_grad_(not frozen or id(p) in head)


def _row(epoch: int, train: dict, val: dict | None, lr: float) -> dict:
    nan = float("nan")
    return {
        "epoch": epoch + 1,
        "train_loss": train["loss"],
        "train_acc": train["acc"],
        "val_loss": val["loss"] if val else nan,
        "val_acc": val["acc"] if val else nan,
        "val_acc5": val["acc5"] if val else nan,
        "lr": lr,
        "epoch_time": train["seconds"],
        "images_per_s": train["images"] / max(train["seconds"], 1e-9),
    }


def _state(epochs_done: int, model, tools: StepTools, scheduler, tracker, log, cfg) -> dict:
    return {
        "epoch": epochs_done,
        "model": model.state_dict(),
        "optimizer": tools.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": tools.scaler.state_dict() if tools.scaler is not None else None,
        "ema": tools.ema.state_dict() if tools.ema is not None else None,
        "tracker": tracker.state_dict(),
        "history": list(log.rows),
        "rng": runtime.rng_state(),
        "config": cfg.to_dict(),
    }


def _restore(state: dict, model, tools: StepTools, scheduler, tracker, log) -> int:
    model.load_state_dict(state["model"])
    tools.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if tools.scaler is not None and state["scaler"] is not None:
        tools.scaler.load_state_dict(state["scaler"])
    if tools.ema is not None and state["ema"] is not None:
        tools.ema.load_state_dict(state["ema"])
    tracker.load_state_dict(state["tracker"])
    log.rows = list(state["history"])
    runtime.set_rng_state(state["rng"])
    return state["epoch"]
