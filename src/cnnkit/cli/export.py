"""``cnnkit export``: ONNX, TorchScript or int8 ONNX, written only after its parity check passes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli.common import DEBUG


def export(
    model: Annotated[Path, typer.Argument(help="model.safetensors file or run folder.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx, torchscript or int8.")] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(help="Output file; default: next to the model (model.onnx, ...)."),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Labelled images for the parity check when the model is not in its run folder."
        ),
    ] = None,
    max_val_images: Annotated[
        int | None, typer.Option(help="Compare on at most this many validation images.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """Export a trained model; fails, writing nothing, when the copy disagrees with the original."""
    from dataclasses import asdict

    from cnnkit.deploy.export import export as run_export

    result = run_export(model, fmt, out=out, data_source=data, max_val_images=max_val_images)
    if as_json:
        record = {"path": str(result.path), "format": result.format}
        record.update(asdict(result.parity), calibration=result.calibration)
        print(json.dumps(record, indent=2))
        return
    print(f"parity ({result.format}): {result.parity.describe()}")
    if result.calibration:
        print(f"calibration: {result.calibration}")
    print(f"wrote {result.path}")
