"""``cnnkit runs`` and ``cnnkit compare``: read run folders, print or write what they hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli.common import DEBUG


def runs(
    folder: Annotated[Path, typer.Argument(help="Folder to look for run folders in.")] = Path(
        "runs"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list instead of a table.")] = (
        False
    ),
    sort: Annotated[
        str | None, typer.Option(help="Column to sort by (numbers: largest first).")
    ] = None,
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """List the runs under FOLDER: model, data, epochs, best val, test accuracy, status..."""
    from cnnkit.evaluation import compare

    rows = [compare.summary(run_dir) for run_dir in compare.find_runs(folder)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(compare.table(rows, sort) if rows else f"no runs under {folder}")


def compare_(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run folders.")],
    out: Annotated[Path, typer.Option(help="Folder for compare.png and compare.html.")] = Path(
        "compare"
    ),
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """Config differences and overlaid loss/accuracy curves of runs (PNG and a small page)."""
    from cnnkit.evaluation import compare

    result = compare.compare(run_dirs, out)
    names = [r.name for r in run_dirs]
    print("config differences:" if result["differences"] else "no config differences")
    for key, values in result["differences"].items():
        print(f"  {key}: " + "  ".join(f"{n}={v}" for n, v in zip(names, values, strict=True)))
    print(f"curves: {result['png']}\npage: {result['html']}")
