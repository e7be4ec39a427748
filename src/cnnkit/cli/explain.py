"""``cnnkit explain``: Grad-CAM / Grad-CAM++ overlays for images, written as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli.common import DEBUG, MODEL_PRECISION


def explain(
    model: Annotated[Path, typer.Argument(help="model.safetensors file or run folder.")],
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    out: Annotated[Path, typer.Option(help="Folder for the overlay PNGs.")] = Path("cams"),
    method: Annotated[str, typer.Option(help="gradcam or gradcam++.")] = "gradcam",
    target: Annotated[
        str | None,
        typer.Option("--class", help="Class to explain; default: each image's prediction."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[str | None, MODEL_PRECISION] = None,
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """Where in each image the model found the evidence for its class."""
    from cnnkit.evaluation.explain import explain as api_explain

    results = api_explain(
        model,
        inputs,
        out,
        method=method,
        target=target,
        device=device,
        batch_size=batch_size,
        precision=precision,
    )
    for r in results:
        print(f"{r['input']}: {r['class']} ({r['prob']:.3f}) -> {r['overlay']}")
