"""``cnnkit predict``: top-k classes for image files, folders and globs."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli.common import DEBUG, MODEL_PRECISION, TTA


def predict(
    model: Annotated[Path, typer.Argument(help="model.safetensors file or run folder.")],
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    top_k: Annotated[int, typer.Option(help="How many classes to list per image.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    as_csv: Annotated[
        bool, typer.Option("--csv", help="Print CSV (input,rank,class,prob).")
    ] = False,
    precision: Annotated[str | None, MODEL_PRECISION] = None,
    tta: Annotated[str, TTA] = "none",
    out: Annotated[
        Path,
        typer.Option(help="Segmentation models: folder for the mask and overlay PNGs."),
    ] = Path("masks"),
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """Classify images with a trained model, using the preprocessing stored in its file; a
    segmentation model writes a palette mask PNG and an overlay PNG (its class colours over the
    image) per image and gives its class fractions."""
    # imported when the verb runs: torch stays off `cnnkit --help` (cli/__init__)
    from cnnkit.deploy.predictor import predict as api_predict

    if top_k < 1:
        raise typer.BadParameter(f"must be at least 1, got {top_k}", param_hint="--top-k")
    results = api_predict(
        model, inputs, top_k=top_k, batch_size=batch_size, device=device, precision=precision,
        mask_dir=out, tta=tta,
    )  # fmt: skip
    if results and "fractions" in results[0]:  # segmentation
        _print_masks(results, as_json)
    elif as_json:
        print(json.dumps(results, indent=2))
    elif as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["input", "rank", "class", "prob"])
        for r in results:
            for rank, t in enumerate(r["top"], 1):
                writer.writerow([r["input"], rank, t["class"], f"{t['prob']:.6f}"])
    else:
        _print_table(results)


def _print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("input", "top classes (probability)")
    for r in results:
        table.add_row(r["input"], "  ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))
    Console().print(table)


def _print_masks(results: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        shares = "  ".join(f"{c} {f:.3f}" for c, f in r["fractions"].items())
        print(f"{r['input']} -> {r['mask']} ({r['overlay']})  {shares}")
