"""``cnnkit train``: parse options and hand them to ``cnnkit.run.train``; print the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli.common import CURRENT_ARGV, DEBUG, split_positionals


def train(
    data: Annotated[
        str | None,
        typer.Argument(
            help="Image folder, CSV of path,label, or built-in name (digits, mnist, fashion-mnist, "
            "cifar10, cifar100). Default: digits.",
            show_default=False,
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Config overrides as section.key=value, e.g. optim.weight_decay=5e-4.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model name (see `cnnkit models`), tv:<torchvision name>, timm:<name>, "
            "your own as pkg.module:Net (a class or @cnnkit.register_model builder), or auto "
            "(the default: chosen from the data and device, said in one line)."
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Number of epochs.")] = None,
    batch_size: Annotated[
        str | None,
        typer.Option(help="Images per step, or auto (measured for this machine and model)."),
    ] = None,
    lr: Annotated[
        str | None,
        typer.Option(help="Peak learning rate, or 'auto' to take the lr finder's suggestion."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            help="Preset under your own settings: default, speedrun or airbench94 (32x32 data)."
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="classification or segmentation (default: segmentation for a folder of "
            "images/ + masks/, else classification)."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Run folder name under runs/.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    val: Annotated[
        str | None,
        typer.Option(
            help="Validation data: folder, CSV or tar shards (default: carved from train)."
        ),
    ] = None,
    test: Annotated[str | None, typer.Option(help="Test data: folder, CSV or tar shards.")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the run in this folder exactly where its checkpoint stopped."),
    ] = None,
    pretrained: Annotated[
        bool,
        typer.Option(
            help="Start from published weights (tv:/timm: models; needs them downloaded)."
        ),
    ] = False,
    weights: Annotated[
        Path | None,
        typer.Option(help="Start from a cnnkit model file or a torchvision/timm state dict."),
    ] = None,
    freeze_epochs: Annotated[
        int | None, typer.Option(help="Train only the classifier head for this many epochs first.")
    ] = None,
    input_size: Annotated[int | None, typer.Option(help="Square input side in pixels.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16.")] = None,
    num_workers: Annotated[int | None, typer.Option(help="DataLoader worker processes.")] = None,
    skip_bad: Annotated[
        bool, typer.Option(help="Leave out image files that cannot be decoded (listed in the run).")
    ] = False,
    balance: Annotated[
        str | None,
        typer.Option(help="sampler, loss, none or auto (sampler when classes are imbalanced)."),
    ] = None,
    nan_policy: Annotated[
        str | None, typer.Option(help="stop (default) or skip steps whose loss is NaN/inf.")
    ] = None,
    resume_changed: Annotated[
        bool, typer.Option(help="Resume even when overrides or the data changed since.")
    ] = False,
    nproc: Annotated[
        int | None,
        typer.Option(help="Train with this many processes on this machine (starts torchrun)."),
    ] = None,
    allow_world_change: Annotated[
        bool,
        typer.Option(help="With --resume: continue with another number of processes."),
    ] = False,
    quiet: Annotated[bool, typer.Option(help="Plain log lines instead of a progress bar.")] = False,
    report: Annotated[
        bool, typer.Option(help="Write report.html and figures at the end (train.report).")
    ] = True,
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """Train a classifier; everything it writes goes to runs/<name>/."""
    # imported when the verb runs: torch stays off `cnnkit --help` (cli/__init__)
    from cnnkit.engine import distributed
    from cnnkit.run import train as run_train

    if nproc is not None:
        code = distributed.launch(nproc, _without_option(CURRENT_ARGV, "--nproc"))
        if code:
            raise typer.Exit(code)
        return
    data, overrides = split_positionals(data, overrides or [])
    result = _stop_cleanly(
        run_train,
        data,
        config=config,
        overrides=overrides,
        resume=resume,
        resume_changed=resume_changed,
        allow_world_change=allow_world_change,
        model=model,
        epochs=epochs,
        batch_size=_batch_size(batch_size),
        val=val,
        test=test,
        lr=_parse_lr(lr),
        seed=seed,
        recipe=recipe,
        task=task,
        name=name,
        pretrained=pretrained or None,
        weights=str(weights) if weights else None,
        freeze_epochs=freeze_epochs,
        input_size=input_size,
        device=device,
        precision=precision,
        num_workers=num_workers,
        progress="plain" if quiet else None,
        skip_bad=skip_bad or None,
        balance=balance,
        nan_policy=nan_policy,
        report=None if report else False,
    )
    if distributed.current().main:
        _summary(result)
    distributed.cleanup()


def _without_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            out.append(arg)
    return out


def _stop_cleanly(run_train, *args, **kwargs):
    """Run training; a stop on SIGINT/SIGTERM (checkpoint saved, resume hint printed) exits with
    128 + the signal (130, 143) instead of a traceback. Typer would report every stop as 130."""
    from cnnkit.engine.interrupt import Interrupted

    try:
        return run_train(*args, **kwargs)
    except Interrupted as e:
        raise typer.Exit(e.exit_code) from None


def _batch_size(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(
            f"'{value}' is not a whole number or auto", param_hint="--batch-size"
        ) from None


def _parse_lr(text: str | None) -> float | str | None:
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(
            f"must be a number or 'auto', got '{text}'", param_hint="--lr"
        ) from None


def _summary(result) -> None:
    fit = result.fit
    if fit.best is not None and fit.history:
        row = fit.history[fit.best_epoch - 1]
        shown = "val_miou" if "val_miou" in row else "val_acc"  # segmentation | classification
        print(
            f"best epoch {fit.best_epoch}/{len(fit.history)}: {shown} {row[shown]:.4f}  "
            f"val_loss {row['val_loss']:.4f}"
        )
    if result.test is not None and "miou" in result.test:
        t = result.test
        ious = "  ".join(f"{r['class']} {r['iou']:.4f}" for r in t["per_class"])
        print(
            f"{result.test_split} (best weights): mIoU {t['miou']:.4f}  dice {t['dice']:.4f}  "
            f"pixel acc {t['pixel_acc']:.4f}  loss {t['loss']:.4f}\n  IoU per class: {ious}"
        )
    elif result.test is not None:
        t = result.test
        print(
            f"{result.test_split} (best weights): acc {t['acc']:.4f}  top-5 {t['acc5']:.4f}  "
            f"loss {t['loss']:.4f}  balanced acc {t['balanced_acc']:.4f}"
        )
    if result.test is not None and result.test_split == "val":
        print(
            "note: scored on the validation split that picked these weights, so it is "
            "optimistic; add a test/ folder (or --test) for a held-out score"
        )
    run = result.run_dir
    print(f"run folder: {run}")
    print(f"next: cnnkit eval {run}   |   cnnkit predict {run / 'model.safetensors'} IMAGES")
