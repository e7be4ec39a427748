"""``cnnkit lr-find``: sweep the learning rate on a copy of the model and suggest one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli.common import DEBUG, split_positionals


def lr_find(
    data: Annotated[
        str | None,
        typer.Argument(
            help="Image folder, CSV or built-in name (default: digits).", show_default=False
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Config overrides as section.key=value.", show_default=False),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model name (see `cnnkit models`).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd or adamw.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    steps: Annotated[int, typer.Option(help="Steps of the sweep (1e-6 to 10).")] = 200,
    out: Annotated[Path, typer.Option(help="Where to write the plot.")] = Path("lr_find.png"),
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """Loss against an exponentially growing lr; prints the suggested lr and plots the curve."""
    # imported when the verb runs: torch stays off `cnnkit --help` (cli/__init__)
    from cnnkit.evaluation.plots import png
    from cnnkit.fileio import atomic_write_bytes
    from cnnkit.run import lr_find as api_lr_find

    if steps < 10:
        raise typer.BadParameter(f"must be at least 10, got {steps}", param_hint="--steps")
    data, overrides = split_positionals(data, overrides or [])
    result = api_lr_find(
        data, config=config, overrides=overrides, steps=steps, model=model,
        batch_size=batch_size, optimizer=optimizer, device=device, seed=seed,
    )  # fmt: skip
    atomic_write_bytes(out, png(result.figure()))
    lrs = result.lrs
    print(f"swept {len(lrs)} steps, lr {lrs[0]:.2g} to {lrs[-1]:.2g}: {result.stopped}")
    if result.suggestion is None:
        print("no suggestion: the loss did not fall at any lr of the sweep")
    else:
        print(
            f"suggested lr: {result.suggestion:.3g}   (cnnkit train --lr {result.suggestion:.3g})"
        )
    print(f"plot: {out}")
