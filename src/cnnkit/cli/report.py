"""``cnnkit report``: (re)build a run's report.html and PNG figures, on any labelled split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli.common import DEBUG, MODEL_PRECISION


def report(
    run: Annotated[
        Path, typer.Argument(help="Run folder (with metrics.csv and model.safetensors).")
    ],
    data: Annotated[
        str | None,
        typer.Option(
            help="Folder of class subfolders, CSV or built-in name to score on; default: the "
            "run's test (else val) split.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for report.html and the PNGs; default: the run.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    num_workers: Annotated[int | None, typer.Option(help="DataLoader workers.")] = None,
    precision: Annotated[str | None, MODEL_PRECISION] = None,
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """Per-class metrics, confusion matrix, calibration, worst mistakes, Grad-CAM, model and run."""
    # imported when the verb runs: torch stays off `cnnkit --help` (cli/__init__)
    from cnnkit.evaluation.scoring import report as api_report

    path = api_report(
        run,
        data,
        out_dir=out,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        precision=precision,
    )
    print(f"report: {path}")
