"""``cnnkit doctor``: a dataset health report; exit 0 when clean, 1 when problems were found."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli.common import DEBUG


def doctor(
    data: Annotated[
        Path,
        typer.Argument(
            help="Image folder: <class>/* or train|val|test/<class>/*; or images/ + masks/ "
            "(segmentation pairs, also per split)."
        ),
    ],
    workers: Annotated[
        int | None, typer.Option(help="Decoding processes; default: one per CPU.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Cache folder of per-file results, as data.cache_dir (training's pre-flight "
            "check shares it); default: $CNNKIT_CACHE_DIR or ~/.cache/cnnkit."
        ),
    ] = None,
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """Decode every image and report bad files, odd modes, class counts and duplicates; for
    image/mask pairs also missing and orphan masks, size and value errors, class pixel shares."""
    from cnnkit.data.doctor import scan, summary
    from cnnkit.data.doctor_pairs import is_pair_folder, scan_pairs

    check = scan_pairs if is_pair_folder(data) else scan
    report = check(data, workers=workers, cache_dir=cache_dir)
    print(json.dumps(report.to_dict(), indent=2) if as_json else summary(report))
    if not report.ok:
        raise typer.Exit(1)
