"""``cnnkit models``: the zoo with parameters and GFLOPs at each model's default input size."""

from __future__ import annotations

import fnmatch
import json
from typing import Annotated

import typer

from cnnkit.cli.common import DEBUG


def models(
    pattern: Annotated[
        str | None, typer.Argument(help="Filter names, e.g. 'resnet*'.", show_default=False)
    ] = None,
    include_test: Annotated[
        bool, typer.Option("--all", help="Include tiny test_* variants.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """List registered models; tv:<name> and timm:<name> wrap torchvision/timm models too."""
    from cnnkit.models import summary_rows

    rows = [
        r
        for r in summary_rows(include_test=include_test)
        if pattern is None or fnmatch.fnmatch(r["name"], pattern)
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "params", "GFLOPs", "input", title="cnnkit models")
    for r in rows:
        table.add_row(
            r["name"],
            f"{r['params'] / 1e6:.2f}M",
            f"{r['gflops']:.3f}",
            "x".join(str(v) for v in r["input_size"]),
        )
    Console().print(table)
    print(
        "also: tv:<torchvision model>, timm:<timm model> (with timm installed), spec (layer list)"
    )
