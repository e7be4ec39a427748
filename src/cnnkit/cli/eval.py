"""``cnnkit eval``: score a trained model on its run's test split or on given data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli.common import DEBUG, MODEL_PRECISION, TTA

MAX_CONFUSION_CLASSES = 20  # wider matrices do not fit a terminal; --json has them all


def eval_(
    run_or_model: Annotated[Path, typer.Argument(help="Run folder or model.safetensors file.")],
    data: Annotated[
        str | None,
        typer.Argument(
            help="Folder of class subfolders or CSV; default: the run's test (else val) split.",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    num_workers: Annotated[int | None, typer.Option(help="DataLoader workers.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    precision: Annotated[str | None, MODEL_PRECISION] = None,
    tta: Annotated[str, TTA] = "none",
    input_size: Annotated[
        int | None,
        typer.Option(
            min=8,
            help="Square side to evaluate at instead of the trained one (a little larger often "
            "scores better: the FixRes effect; compare both).",
            show_default=False,
        ),
    ] = None,
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """Loss, top-1/top-5, per-class precision/recall/F1 and the confusion matrix (segmentation:
    mIoU, Dice, pixel accuracy, per-class IoU/Dice and the pixel confusion matrix)."""
    # imported when the verb runs: torch stays off `cnnkit --help` (cli/__init__)
    from cnnkit.evaluation.scoring import evaluate

    metrics = evaluate(
        run_or_model,
        data,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        precision=precision,
        tta=tta,
        input_size=input_size,
    )
    if as_json:
        print(json.dumps(metrics, indent=2))
    else:
        _print_tables(metrics)


def _print_tables(m: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head, without, columns, rows, title = (_segmentation if "miou" in m else _classification)(m)
    console.print(f"split {m['split']}: {m['images']} images  {head}")
    if "input_size" in m:
        trained = "x".join(map(str, m["trained_size"]))
        console.print(f"evaluated at {m['input_size']} px; the model trained at {trained}")
    if "tta" in m:
        console.print(f"with tta {m['tta']}; without: {without()}")
    table = Table(*columns, title="per class")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    _print_confusion(console, m["classes"], m["confusion"], title)


def _classification(m: dict) -> tuple:
    """(headline, the headline without TTA (called when there was TTA), per-class columns and
    rows, confusion title) of a classifier's metrics."""
    head = (
        f"acc {m['acc']:.4f}  top-5 {m['acc5']:.4f}  loss {m['loss']:.4f}  "
        f"balanced acc {m['balanced_acc']:.4f}  macro F1 {m['macro_f1']:.4f}"
    )
    rows = [
        (r["class"], *(f"{r[key]:.3f}" for key in ("precision", "recall", "f1")), str(r["support"]))
        for r in m["per_class"]
    ]
    columns = ("class", "precision", "recall", "F1", "support")
    return head, lambda: f"acc {m['acc_no_tta']:.4f}", columns, rows, "confusion matrix"


def _segmentation(m: dict) -> tuple:
    """As ``_classification``, for a segmentation model's scores over pixels."""
    head = (
        f"mIoU {m['miou']:.4f}  dice {m['dice']:.4f}  pixel acc {m['pixel_acc']:.4f}  "
        f"loss {m['loss']:.4f}"
    )

    def without() -> str:
        return f"mIoU {m['miou_no_tta']:.4f}  pixel acc {m['pixel_acc_no_tta']:.4f}"

    rows = [
        (r["class"], f"{r['iou']:.3f}", f"{r['dice']:.3f}", str(r["pixels"]))
        for r in m["per_class"]
    ]
    return head, without, ("class", "IoU", "Dice", "pixels"), rows, "pixel confusion matrix"


def _print_confusion(console, classes: list[str], confusion: list, title: str) -> None:
    from rich.table import Table

    if len(classes) > MAX_CONFUSION_CLASSES:
        console.print(f"confusion matrix: {len(classes)} classes, too wide to print; use --json")
        return
    cm = Table("true \\ pred", *[c[:8] for c in classes], title=title)
    for name, row in zip(classes, confusion, strict=True):
        cm.add_row(name[:12], *[str(v) for v in row])
    console.print(cm)
