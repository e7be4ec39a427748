"""``cnnkit tune``: parse options and hand them to ``cnnkit.study.tune``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli.common import DEBUG, split_positionals


def tune(
    data: Annotated[
        str | None,
        typer.Argument(help="Image folder, CSV or built-in name, as for train. Default: digits."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Config overrides for every trial, as section.key=value."),
    ] = None,
    trials: Annotated[
        int, typer.Option(help="Finished or pruned trials the study ends with.")
    ] = 20,
    timeout: Annotated[
        float | None, typer.Option(help="Start no trial after this many seconds.")
    ] = None,
    space: Annotated[
        Path | None, typer.Option(help="YAML search space laid over the recipe's default.")
    ] = None,
    metric: Annotated[
        str | None, typer.Option(help="Metric to optimise (default: train.monitor, val_acc).")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL of the study (default: SQLite in the study folder)."),
    ] = None,
    study: Annotated[
        str | None, typer.Option(help="Study name and folder under runs/ (default: from data).")
    ] = None,
    pruner: Annotated[str, typer.Option(help="median, hyperband or none.")] = "median",
    jobs: Annotated[int, typer.Option(help="Processes on this machine sharing the study.")] = 1,
    model: Annotated[str | None, typer.Option(help="Model name, as for train.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epoch budget of each trial.")] = None,
    recipe: Annotated[str | None, typer.Option(help="default, speedrun or airbench94.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config of every trial.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the runs and the sampler.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16.")] = None,
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """Search hyperparameters with Optuna; each trial is a run under runs/<study>/."""
    from cnnkit.study import tune as run_tune  # torch and optuna stay off `cnnkit --help`

    data, overrides = split_positionals(data, overrides or [])
    run_tune(
        data,
        trials=trials,
        timeout=timeout,
        space_file=space,
        metric=metric,
        storage=storage,
        study=study,
        pruner=pruner,
        jobs=jobs,
        config=config,
        overrides=overrides,
        model=model,
        epochs=epochs,
        recipe=recipe,
        seed=seed,
        device=device,
        precision=precision,
    )
