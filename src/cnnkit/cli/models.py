"""``cnnkit models``: the zoo with parameters and GFLOPs at each model's default input size;
``--layers``: one model (or spec.yaml) layer by layer, naming the layer that cannot run."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from typing import Annotated

import typer

from cnnkit.cli.common import DEBUG


def models(
    pattern: Annotated[
        str | None,
        typer.Argument(
            help="Filter names, e.g. 'resnet*'; with --layers: a model name or spec.yaml.",
            show_default=False,
        ),
    ] = None,
    include_test: Annotated[
        bool, typer.Option("--all", help="Include tiny test_* variants.")
    ] = False,
    layers: Annotated[
        bool,
        typer.Option(
            "--layers", help="Each layer's output shape, parameters, FLOPs, receptive field."
        ),
    ] = False,
    input_size: Annotated[
        int | None,
        typer.Option(help="With --layers: square input side (default: the model's).", min=1),
    ] = None,
    in_chans: Annotated[
        int, typer.Option(help="With --layers: input channels (1 grayscale, 3 RGB).", min=1)
    ] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """List registered models; tv:<name>, timm:<name> and pkg.module:Net (your own) work too."""
    if layers:
        _layers(pattern, input_size, in_chans, as_json)
        return
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
        "also: tv:<torchvision model>, timm:<timm model> (with timm installed), spec (layer list), "
        "pkg.module:YourNet; for segmentation, a decoder head on any of them: fpn:<backbone>, "
        "deeplab:<backbone> (e.g. fpn:resnet18_slim, deeplab:tv:resnet18)"
    )


def _layers(target: str | None, side: int | None, in_chans: int, as_json: bool) -> None:
    from cnnkit.errors import CnnkitError
    from cnnkit.models import layer_table, model_for_layers

    if target is None:
        raise typer.BadParameter("--layers needs a model name or a spec.yaml", param_hint="NAME")
    model, labels = model_for_layers(target, in_chans)
    size = model.default_cfg["input_size"]
    size = (in_chans, side, side) if side is not None else (in_chans, *size[1:])
    table = layer_table(model, size, labels)
    if as_json:
        print(json.dumps(dataclasses.asdict(table), indent=2))
    else:
        _print_table(target, table)
    if table.error is not None:
        raise CnnkitError(table.error)


def _print_table(target: str, table) -> None:
    from rich.console import Console
    from rich.table import Table

    spec = any(r.entry for r in table.rows)
    columns = ["entry"] if spec else []
    title = f"{target} on {'x'.join(map(str, table.input_size))}"
    out = Table(*columns, "layer", "type", "output", "params", "FLOPs", "RF", title=title)
    for r in table.rows:
        rf = "all" if r.receptive_field is None else _side(r.receptive_field)
        shape = "x".join(map(str, r.output[1:])) if isinstance(r.output, tuple) else r.output
        cells = [r.entry] if spec else []
        out.add_row(*cells, r.name, r.layer, shape, _count(r.params), _count(r.flops), rf)
    Console(width=max(Console().width, 110)).print(out)
    state = "stopped at the failure" if table.error else f"output {table.output}"
    print(f"total: {_count(table.params)} params, {_count(table.flops)} FLOPs, {state}")


def _side(pair: tuple[int, int]) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def _count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
