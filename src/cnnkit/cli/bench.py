"""``cnnkit bench``: batch-1 latency and batch-N throughput across CPU runtimes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli.common import DEBUG


def bench(
    model: Annotated[Path, typer.Argument(help="model.safetensors, .onnx file or run folder.")],
    batch_size: Annotated[int, typer.Option(help="Batch size for the throughput column.")] = 64,
    seconds: Annotated[float, typer.Option(help="Seconds of timing per measurement.")] = 2.0,
    runtime: Annotated[
        list[str] | None,
        typer.Option(help="Only these: eager, bf16, compile, ort, int8 (repeatable)."),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (torch and ORT).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """Time eager fp32/bf16, torch.compile, ONNX Runtime fp32 and int8 on random inputs."""
    import torch

    from cnnkit.deploy.bench import RUNTIMES
    from cnnkit.deploy.bench import bench as run_bench
    from cnnkit.errors import CnnkitError

    unknown = sorted(set(runtime or []) - set(RUNTIMES))
    if unknown:
        raise CnnkitError(f"unknown --runtime {', '.join(unknown)}; use {', '.join(RUNTIMES)}")
    if batch_size < 1 or seconds <= 0:
        raise CnnkitError("--batch-size must be >= 1 and --seconds > 0")
    if threads is not None:
        torch.set_num_threads(threads)
    rows = run_bench(model, batch_size=batch_size, seconds=seconds, runtimes=runtime)
    if as_json:
        print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))
        return
    _print_table(rows, torch.get_num_threads())


def _print_table(rows: list[dict], threads: int) -> None:
    from rich.console import Console
    from rich.table import Table

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    table = Table(
        "runtime",
        "p50 ms (b=1)",
        "p99 ms (b=1)",
        f"images/s (b={rows[0]['batch_size']})",
        "vs eager",
        "note",
        title=f"inference on CPU, {threads} threads",
    )
    for r in rows:
        table.add_row(
            r["runtime"],
            num(r["latency_p50_ms"], ".2f"),
            num(r["latency_p99_ms"], ".2f"),
            num(r["throughput"], ".0f"),
            num(r["speedup"], ".2f") + ("x" if r["speedup"] else ""),
            r["note"],
        )
    Console().print(table)
