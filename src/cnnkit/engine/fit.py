"""fit(): the outer training loop, top to bottom.

Each epoch: seed the epoch's randomness from (seed, epoch), train, validate, step the schedule,
keep the best weights in ``model.safetensors``, log a row to ``metrics.csv``, then write
``checkpoints/last.pt`` with everything needed to continue exactly from here (the one before is
kept as ``previous.pt``).

SIGINT/SIGTERM stop after the current step: the checkpoint then also records the step within the
epoch, the RNG state and the epoch's partial sums, and resuming continues the same batches. A
non-finite loss stops the run naming the step and the batch's files (or is skipped, as
``train.nan_policy`` says); nothing non-finite is ever written.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnkit.config import Config
from cnnkit.data.loader import EpochSampler
from cnnkit.data.memory import run_loader
from cnnkit.engine import distributed, runtime
from cnnkit.engine.callbacks import (
    BestTracker,
    MetricsLog,
    Progress,
    SilentProgress,
    weight_averager,
)
from cnnkit.engine.checkpoint import save_checkpoint
from cnnkit.engine.interrupt import Interrupted, StopRequest
from cnnkit.engine.loop import (
    NonFiniteLoss,
    StepTools,
    Stopped,
    evaluate,
    scaled_side,
    train_one_epoch,
)
from cnnkit.engine.optim import EPOCH_SCHEDULERS, create_optimizer, create_scheduler
from cnnkit.errors import CnnkitError
from cnnkit.modelfile import MODEL_FILE, save_model_file
from cnnkit.tasks import Task

CHECKPOINT = Path("checkpoints") / "last.pt"
INIT_SAMPLE = 5000  # training images shown to a model's init_from_data (airbench whitens on 5000)


@dataclass
class FitResult:
    run_dir: Path
    history: list[dict]
    best: float | None  # best value of the monitored metric
    best_epoch: int  # 1-based; 0 when no epoch ran
    epochs_done: int
    stopped_early: bool
    model: nn.Module | None = None  # the trained module with its last weights (not the best)
    timings: dict = field(default_factory=dict)  # seconds: init_from_data; api adds final_eval


def fit(
    model: nn.Module,
    splits,
    cfg: Config,
    run_dir: Path,
    model_meta: dict,
    rt: runtime.Runtime,
    task: Task,
    *,
    resume: dict | None = None,
    stop_after: int | None = None,
    allow_world_change: bool = False,
    after_step: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``splits`` as ``cfg`` says, writing everything into ``run_dir``.

    ``model_meta`` is stored in the model file (architecture, classes, preprocessing). ``rt`` is
    the run's one resolved runtime (device, precision, layout, compile; ``runtime.resolve``);
    ``task`` supplies the loss, the metrics, class balancing and batch mixing (``cnnkit.tasks``).
    ``resume`` is a checkpoint dict to continue from; ``stop_after`` ends this call after that
    many epochs (the run can be resumed later), for time-boxed jobs. ``after_step(epoch, step)``
    is called after every training step (fault-injection tests use it); ``on_epoch(row)`` after
    each epoch's row is logged and checkpointed, and may raise to end the run there (a study's
    pruner does: ``cnnkit.study``). In a distributed run (see ``cnnkit.engine.distributed``)
    every process calls this; only rank 0 writes.
    """
    tc = cfg.train
    _check_monitor(cfg, has_val=splits.val is not None)
    dd = distributed.current()
    model = model.to(rt.device, memory_format=rt.memory_format)
    num_classes = len(splits.classes)
    balance = task.balance(tc.balance, splits.train.targets, num_classes)
    progress = (
        Progress(tc.progress, tc.epochs, task.shown) if dd.main else SilentProgress(tc.epochs)
    )
    weights = balance.sample_weights
    train_loader = _loader(splits, splits.train, cfg, rt, progress.message, dd, weights)
    has_val = splits.val is not None
    val_loader = _loader(splits, splits.val, cfg, rt, progress.message, dd) if has_val else None

    timings = {} if resume else _init_from_data(model, train_loader, rt)
    # the default lr follows the global batch: batch_size per process x processes
    optimizer = create_optimizer(
        model,
        cfg.optim,
        cfg.data.batch_size * dd.world_size,
        early=_early_params(model, cfg, len(train_loader)),
    )
    scheduler = create_scheduler(optimizer, cfg.optim, tc.epochs, len(train_loader))
    per_step = cfg.optim.scheduler not in EPOCH_SCHEDULERS
    class_weights = balance.class_weights
    class_weights = class_weights.to(rt.device) if class_weights is not None else None
    val_loss = task.loss(0.0, None)  # validation scores the plain loss, without smoothing
    tools = StepTools(
        optimizer=optimizer,
        loss_fn=task.loss(tc.label_smoothing, class_weights),
        scheduler=scheduler if per_step else None,
        scaler=rt.grad_scaler(),
        grad_clip=tc.grad_clip,
        mix=task.mix(splits.augment, num_classes),
        ema=weight_averager(model, tc, tc.epochs * len(train_loader)),
        note=progress.message,
        nan_policy=tc.nan_policy,
        nan_limit=tc.nan_limit,
        freeze_bn=tc.bn_stats == "frozen",
    )
    # DDP and compiled wrappers share the parameters; state dicts are always taken from ``model``
    train_model = distributed.wrap(model, rt.device, cfg.runtime.sync_bn)
    train_model = torch.compile(train_model) if rt.compile else train_model
    tracker = BestTracker(tc.monitor, tc.patience)
    log = MetricsLog(run_dir, tc.tensorboard, write=dd.main)
    start, start_step, partial = (0, 0, None)
    if resume:
        _check_world_size(resume, dd.world_size, allow_world_change)
        start, start_step, partial = _restore(resume, model, tools, scheduler, tracker, log)
    scales = progressive_scales(tc)
    if any(scale != 1.0 for scale in scales):
        side = splits.input_size[-1]
        sides = ",".join(str(scaled_side(side, scale)) for scale in scales)
        progress.message(f"progressive resizing: train side by epoch {sides}")
    progress.message(
        f"training {model_meta['arch']} on {splits.name}: "
        f"{len(splits.train)} train / {len(splits.val) if splits.val else 0} val "
        f"images, {num_classes} classes, {rt.describe()}, balance {balance.mode}, "
        f"epochs {start + 1}..{tc.epochs}"
        + (f" (from step {start_step})" if start_step else "")
        + (f", {dd.world_size} processes" if dd.enabled else "")
    )

    def save(epochs_done: int, **extra) -> None:
        if dd.main:
            state = _state(
                epochs_done, model, tools, scheduler, tracker, log, cfg, splits.fingerprint
            )
            state = {**state, "world_size": dd.world_size, **extra}
            save_checkpoint(run_dir / CHECKPOINT, state, keep_previous=True)
        distributed.barrier()  # nobody runs ahead of (or reads) a checkpoint being written

    stop = tools.stop = StopRequest().install()
    try:
        for epoch in range(start, tc.epochs):
            if tc.freeze_epochs:
                _set_frozen(model, frozen=epoch < tc.freeze_epochs)
            torch.manual_seed(runtime.epoch_seed(tc.seed, epoch))  # dropout, MixUp draws
            skip = start_step if epoch == start else 0  # steps already done (resumed mid-epoch)
            _set_epoch(train_loader, epoch, skip)
            if skip:
                runtime.set_rng_state(resume["rng"])  # the RNG as it was at the interruption
            lr = partial["lr"] if skip else optimizer.param_groups[0]["lr"]
            progress.start_epoch(epoch, len(train_loader))
            tools.after_step = functools.partial(after_step, epoch) if after_step else None
            tools.scale = scales[epoch]
            metrics = task.metrics(num_classes, rt.device, train=True)
            if skip and dd.main:  # the interrupted epoch's sums so far (saved by rank 0)
                sums = metrics.sums()
                sums.add_(torch.tensor(partial["sums"], dtype=sums.dtype, device=sums.device))
            try:
                train = train_one_epoch(
                    train_model, train_loader, tools, rt, metrics, progress.step
                )
            except Stopped as s:
                save(epoch, step=skip + s.steps, partial={"sums": s.totals, "lr": lr})
                raise Interrupted(stop.signum, _stopped(run_dir, epoch, skip + s.steps)) from None
            except NonFiniteLoss as e:
                files = _batch_files(train_loader, splits.train, e.step)
                raise CnnkitError(_non_finite_message(e, epoch, skip, files, tc)) from None
            if rt.compile and epoch == start:
                progress.message(f"compile warm-up: {train['first_step']:.1f} s (first step)")
            eval_model = tools.ema.module if tools.ema is not None else model
            val = None
            if val_loader is not None:
                val_metrics = task.metrics(num_classes, rt.device, train=False)
                val = evaluate(eval_model, val_loader, rt, val_metrics, val_loss)
            row = _row(epoch, train, val, lr, task)
            if val is not None:
                row.update(task.val_extras(val, splits.classes, balance))
            if not per_step:
                scheduler.step(tracker.score(row))
            improved = val is None or tracker.update(row, epoch + 1)
            if improved and dd.main:
                save_model_file(run_dir / MODEL_FILE, eval_model.state_dict(), model_meta)
            log.append(row)
            progress.end_epoch(row)
            save(epoch + 1)
            if on_epoch is not None:
                on_epoch(row)
            if stop():
                raise Interrupted(stop.signum, _stopped(run_dir, epoch + 1, 0))
            if tracker.should_stop:
                progress.message(
                    f"early stop: {tc.monitor} has not improved for "
                    f"{tc.patience} epochs (best {tracker.best:.4f} at epoch "
                    f"{tracker.best_epoch})"
                )
                break
            if stop_after is not None and epoch + 1 - start >= stop_after:
                break
        if dd.main:
            log.hparams(_hparams(cfg), {tc.monitor: tracker.best, **log.rows[-1]})
    finally:
        stop.restore()
        progress.close()
        log.close()
    return FitResult(
        run_dir=run_dir,
        history=log.rows,
        best=tracker.best,
        best_epoch=max(tracker.best_epoch, 0) if val_loader else len(log.rows),
        epochs_done=len(log.rows),
        stopped_early=tracker.should_stop,
        model=model,
        timings=timings,
    )


def _hparams(cfg: Config) -> dict:
    """The config as flat ``section.key`` scalars, for TensorBoard's HParams tab."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            scalar = value is None or isinstance(value, (bool, int, float, str))
            flat[f"{section}.{key}"] = value if scalar and value is not None else str(value)
    return flat


def _loader(splits, dataset, cfg: Config, rt: runtime.Runtime, note, dd, weights=None):
    """In-memory batches augmented on the device when the split fits, else a DataLoader.
    Distributed: each process trains on its share; validation reads the whole split."""
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
        weights=weights,
        rank=dd.rank if train else 0,
        world_size=dd.world_size if train else 1,
    )


def progressive_scales(tc) -> list[float]:
    """Each epoch's train side as a fraction of the input size: from ``progressive_min`` growing
    linearly to 1 at ``progressive_epochs`` of the run, then 1 (all 1 when off)."""
    ramp = tc.progressive_epochs * tc.epochs
    lo = tc.progressive_min
    return [lo + (1 - lo) * e / ramp if e < ramp else 1.0 for e in range(tc.epochs)]


def _early_params(model: nn.Module, cfg: Config, steps_per_epoch: int):
    """(parameters, steps) trained only for the first steps: the whitening bias of a model with
    a ``whiten`` layer when ``optim.whiten_bias_epochs`` is set; else None."""
    epochs = cfg.optim.whiten_bias_epochs
    if epochs is None:
        return None
    bias = getattr(getattr(model, "whiten", None), "bias", None)
    if not isinstance(bias, nn.Parameter):
        raise CnnkitError(
            f"optim.whiten_bias_epochs is for models with a whitening layer (speedrun_net); "
            f"{cfg.model.name} has none: unset it"
        )
    return [bias], round(epochs * steps_per_epoch)


def _init_from_data(model: nn.Module, loader, rt: runtime.Runtime) -> dict:
    """Let a model set weights from data once before training (speedrun_net's whitening conv),
    from up to INIT_SAMPLE images of epoch 0; on resume the checkpoint holds them already."""
    if not hasattr(model, "init_from_data"):
        return {}
    start, batches, seen = time.perf_counter(), [], 0
    _set_epoch(loader, 0, 0)
    for images, _ in loader:
        batches.append(images)
        seen += images.shape[0]
        if seen >= INIT_SAMPLE:
            break
    model.init_from_data(rt.to_device(torch.cat(batches)[:INIT_SAMPLE]))
    return {"init_from_data": time.perf_counter() - start}


def _stopped(run_dir: Path, epochs_done: int, step: int) -> str:
    where = f"epoch {epochs_done + 1} step {step}" if step else f"the end of epoch {epochs_done}"
    return f"stopped at {where}; checkpoint saved; continue with: cnnkit train --resume {run_dir}"


def _set_epoch(loader, epoch: int, skip_steps: int) -> None:
    """Select ``epoch`` (its first ``skip_steps`` steps already done, after a mid-epoch stop)."""
    if isinstance(getattr(loader, "sampler", None), EpochSampler):
        loader.sampler.set_epoch(epoch, start=skip_steps * loader.batch_size)
        return
    if skip_steps:  # streamed shards have no random access to skip into
        raise CnnkitError(
            "this run stopped in the middle of an epoch and its data is streamed from shards, "
            "which cannot resume mid-epoch; resume from the previous epoch's checkpoint"
        )
    loader.set_epoch(epoch)


def _batch_files(loader, dataset, step: int) -> list[str]:
    """The files (or sample indices, for in-memory data) of batch ``step`` of the current pass."""
    if not isinstance(getattr(loader, "sampler", None), EpochSampler):
        return ["(streamed shards: not recorded)"]
    size = loader.batch_size
    indices = [i for i, _ in loader.sampler][step * size : (step + 1) * size]
    paths = getattr(dataset, "paths", None)
    return [str(paths[i]) for i in indices] if paths is not None else [f"#{i}" for i in indices]


def _non_finite_message(e: NonFiniteLoss, epoch: int, skip: int, files: list[str], tc) -> str:
    limit = f" after skipping {e.skipped} (train.nan_limit)" if tc.nan_policy == "skip" else ""
    shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
    return (
        f"non-finite loss ({e.value}) at epoch {epoch + 1} step {skip + e.step + 1}{limit}; "
        f"batch: {shown}; no update was applied and no checkpoint or model file was written "
        "for it. Check those images, lower the learning rate, or use --nan-policy skip"
    )


def _check_world_size(state: dict, world_size: int, allowed: bool) -> None:
    saved = state.get("world_size", 1)
    if saved != world_size and not allowed:
        raise CnnkitError(
            f"this run was trained with {saved} process(es) and is resumed with {world_size}; "
            "each process's share of the data would change, so it would not continue exactly. "
            f"Resume with {saved} process(es), or pass --allow-world-change"
        )


def _check_monitor(cfg: Config, has_val: bool) -> None:
    monitor = cfg.train.monitor
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


def _row(epoch: int, train: dict, val: dict | None, lr: float, task: Task) -> dict:
    """One metrics.csv row: the task's fields of the epoch's train and val summaries, then the
    lr and speed (NaN where there is no validation split)."""
    nan = float("nan")
    return {
        "epoch": epoch + 1,
        **{f"train_{k}": train[k] for k in task.train_fields},
        **{f"val_{k}": val[k] if val else nan for k in task.val_fields},
        "lr": lr,
        "epoch_time": train["seconds"],
        "images_per_s": train["images"] / max(train["seconds"], 1e-9),
        "skipped_steps": train.get("skipped_steps", 0),
    }


def _state(
    epochs_done: int, model, tools: StepTools, scheduler, tracker, log, cfg, fingerprint: str
) -> dict:
    return {
        "epoch": epochs_done,
        "step": 0,  # steps done in epoch ``epoch`` (interrupted mid-epoch), with their sums:
        "partial": None,
        "nan_skipped": tools.skipped,
        "fingerprint": fingerprint,
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


def _restore(state: dict, model, tools: StepTools, scheduler, tracker, log) -> tuple:
    """Load ``state`` into the training objects; (epochs done, steps into the next, partial)."""
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
    tools.skipped = state.get("nan_skipped", 0)
    return state["epoch"], state.get("step", 0), state.get("partial")
