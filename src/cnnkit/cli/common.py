"""What several verbs share: the --debug and --precision options, the running command's
arguments (for ``--nproc`` relaunches) and splitting DATA from ``section.key=value`` overrides."""

from __future__ import annotations

from pathlib import Path

import typer

DEBUG = typer.Option("--debug", help="Show the full traceback on errors.")
# the verbs that use a trained model score and predict at the precision the run trained with
MODEL_PRECISION = typer.Option(
    "--precision",
    help="fp32, bf16, fp16 or auto; default: the precision the run trained with.",
    show_default=False,
)
TTA = typer.Option(
    help="Test-time augmentation: none, flip (2 views) or flip_translate (6 views, averaged)."
)
CURRENT_ARGV: list[str] = []  # the running command's arguments, set by cli.main.run


def split_positionals(data: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """``cnnkit train optim.lr=0.1``: a first positional that is an override is not DATA."""
    if data is not None and "=" in data and not Path(data).exists():
        return None, [data, *overrides]
    return data, overrides
