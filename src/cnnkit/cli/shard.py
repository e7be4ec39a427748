"""``cnnkit shard``: write a dataset as WebDataset tar shards to train from (``cnnkit train
'out/train-{000000..000009}.tar' --val out/val-000000.tar``)."""

from __future__ import annotations

from typing import Annotated

import typer

from cnnkit.cli.common import DEBUG


def shard(
    data: Annotated[
        str,
        typer.Argument(
            help="Image folder (with train/ val/ test/ or class folders), CSV or built-in name."
        ),
    ],
    out: Annotated[
        str, typer.Argument(help="Empty folder to write the shards and meta.json into.")
    ],
    shard_size: Annotated[
        str, typer.Option(help="Largest shard file, e.g. 1GB, 256MB, 64MiB.")
    ] = "1GB",
    samples_per_shard: Annotated[
        int | None, typer.Option(help="Also cap each shard at this many images.")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the order training images are written in.")
    ] = 0,
    debug: Annotated[bool, DEBUG] = False,
) -> None:
    """Write DATA's splits as train-000000.tar, ..., val-*.tar, test-*.tar plus meta.json."""
    from cnnkit.data.shards import parse_size, write_shards
    from cnnkit.errors import CnnkitError

    if samples_per_shard is not None and samples_per_shard < 1:
        raise CnnkitError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    size = parse_size(shard_size)
    if size < 1024:
        raise CnnkitError(f"--shard-size {shard_size} is under 1 KiB; use e.g. 256MB")
    meta = write_shards(data, out, shard_size=size, samples_per_shard=samples_per_shard, seed=seed)
    splits = ", ".join(f"{k}: {len(v)} shard(s)" for k, v in meta["shards"].items())
    last = len(meta["shards"].get("train", {})) - 1
    print(f"wrote {out} ({splits})")
    print(f"train with: cnnkit train '{out}/train-{{000000..{last:06d}}}.tar'")
