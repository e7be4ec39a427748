"""WebDataset tar shards: writing, reading back, splitting over ranks/workers, training."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import cnnkit
from cnnkit.cli.main import run
from cnnkit.config import DataConfig
from cnnkit.data import build
from cnnkit.data.images import load_image
from cnnkit.data.loader import make_loader
from cnnkit.data.shards import ShardDataset, parse_size, shard_dataset, write_shards
from cnnkit.errors import CnnkitError


def unique_folder(root, n_per_class=10, classes=("a", "b", "c")):
    """Images whose top-left pixel encodes a unique id, so every sample can be recognised."""
    for c, name in enumerate(classes):
        for i in range(n_per_class):
            uid = c * n_per_class + i
            pixels = np.full((12, 12, 3), (uid, 255 - uid, 7 * c), dtype=np.uint8)
            path = root / name / f"{i}.{'png' if i % 2 else 'bmp'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


def uid(image) -> int:
    return int(np.asarray(image)[0, 0, 0])


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("64MiB") == 64 * 2**20
    assert parse_size("500 kb") == 500_000 and parse_size("1e6") == 10**6
    with pytest.raises(CnnkitError, match="1GB"):
        parse_size("lots")


def test_folder_round_trip_same_images_and_labels(tmp_path):
    root = unique_folder(tmp_path / "src")
    meta = write_shards(str(root), tmp_path / "out", samples_per_shard=7, note=lambda m: None)
    assert meta["classes"] == ["a", "b", "c"] and len(meta["shards"]["train"]) == 5  # 30 / 7
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    dataset = shard_dataset(str(tmp_path / "out" / "train-{000000..000004}.tar"), shuffle=False)
    assert len(dataset) == 30
    samples = list(dataset)
    assert len(samples) == 30
    originals = {
        uid(load_image(p)): (load_image(p), label)
        for label, name in enumerate("abc")
        for p in (root / name).iterdir()
    }
    assert sorted(uid(image) for image, _ in samples) == list(range(30))
    for image, label in samples:
        expected, expected_label = originals[uid(image)]
        assert label == expected_label
        assert np.array_equal(np.asarray(image), np.asarray(expected))
    labels_in_first_shard = {label for _, label in samples[:7]}
    assert len(labels_in_first_shard) > 1  # training samples are written shuffled


def test_ranks_cover_the_data_once_per_epoch_and_order_changes(tmp_path):
    root = unique_folder(tmp_path / "src", n_per_class=8)  # 24 images
    write_shards(str(root), tmp_path / "out", samples_per_shard=4, note=lambda m: None)
    source = str(tmp_path / "out" / "train-{000000..000005}.tar")
    orders = []
    for epoch in (0, 1):
        seen = []
        shard_sets = []
        for rank in (0, 1):
            dataset = shard_dataset(source, shuffle=True)
            dataset.shuffle_buffer = 5
            dataset.set_rank(rank, 2)
            dataset.set_epoch(epoch)
            shard_sets.append(set(dataset.slot_shards(epoch, rank, 0, 1)))
            ranks_samples = [uid(image) for image, _ in dataset]
            assert len(ranks_samples) == 12  # len // world_size, the same on every rank
            seen += ranks_samples
        assert not shard_sets[0] & shard_sets[1]
        assert len(shard_sets[0] | shard_sets[1]) == 6
        assert sorted(seen) == list(range(24))  # every image exactly once
        orders.append(seen)
    assert orders[0] != orders[1]


def test_uneven_shards_give_every_rank_the_same_count(tmp_path):
    root = unique_folder(tmp_path / "src", n_per_class=7)  # 21 images in shards of 8, 8, 5
    write_shards(str(root), tmp_path / "out", samples_per_shard=8, note=lambda m: None)
    source = str(tmp_path / "out" / "train-{000000..000002}.tar")
    for rank in (0, 1):
        dataset = shard_dataset(source, shuffle=True)
        dataset.set_rank(rank, 2)
        assert len(list(dataset)) == 10  # 21 // 2 on each rank: no rank waits for another


def _uid_tensor(image) -> torch.Tensor:
    return torch.tensor(uid(image))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_workers_share_the_shards_and_follow_the_epoch(tmp_path, workers):
    root = unique_folder(tmp_path / "src", n_per_class=8)  # 24 images, ids 0..23, class id // 8
    write_shards(str(root), tmp_path / "out", samples_per_shard=4, note=lambda m: None)
    source = str(tmp_path / "out" / "train-{000000..000005}.tar")
    train = shard_dataset(source, shuffle=True).with_transform(_uid_tensor)
    train.shuffle_buffer = 5
    loader = make_loader(train, 4, train=True, seed=0, num_workers=workers)
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == 6
        ids = torch.cat([x for x, _ in batches])
        labels = torch.cat([y for _, y in batches])
        assert sorted(ids.tolist()) == list(range(24))  # every image once, whatever the worker
        assert torch.equal(labels, ids // 8)
        orders.append(ids.tolist())
    assert orders[0] != orders[1]  # the epoch reached the workers
    uneven = make_loader(train, 5, train=True, seed=0, num_workers=workers)  # drops partials
    assert len(list(uneven)) == len(uneven)  # the step count a distributed epoch relies on
    test = shard_dataset(source, shuffle=False).with_transform(_uid_tensor)
    ids = torch.cat([x for x, _ in make_loader(test, 4, train=False, seed=0, num_workers=workers)])
    assert sorted(ids.tolist()) == list(range(24))


def test_shards_through_fsspec_memory_filesystem(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    root = unique_folder(tmp_path / "src", n_per_class=3)
    write_shards(str(root), tmp_path / "out", note=lambda m: None)
    fs = fsspec.filesystem("memory")
    for f in (tmp_path / "out").iterdir():
        fs.pipe(f"/shards/{f.name}", f.read_bytes())
    dataset = shard_dataset("memory://shards/train-000000.tar", shuffle=False)
    assert sorted(uid(image) for image, _ in dataset) == list(range(9))


def test_bad_shard_sources_are_named(tmp_path, capsys):
    with pytest.raises(CnnkitError, match="shard not found"):
        shard_dataset(str(tmp_path / "nope-{000000..000001}.tar"), shuffle=True)
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "x-000000.tar").write_bytes(b"")
    with pytest.raises(CnnkitError, match="meta.json"):
        shard_dataset(str(tmp_path / "lonely" / "x-000000.tar"), shuffle=True)
    root = unique_folder(tmp_path / "src", n_per_class=2)
    assert run(["shard", str(root), str(tmp_path / "o"), "--shard-size", "1MB"]) == 0
    code = run(["shard", str(root), str(tmp_path / "o")])
    assert code == 2 and "already holds .tar shards" in capsys.readouterr().err
    assert run(["shard", str(root), str(tmp_path / "o2"), "--shard-size", "huge"]) == 2


def digits_folder(root):
    digits = load_digits()
    counts = collections.Counter()
    for image, label in zip(digits.images, digits.target, strict=True):
        split = "test" if counts[label] % 5 == 4 else "train"
        counts[label] += 1
        path = root / split / str(label) / f"{counts[label]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).round().astype(np.uint8), mode="L").save(path)
    return root


def test_training_from_shards_matches_training_from_the_folder(tmp_path):
    root = digits_folder(tmp_path / "digits")
    meta = write_shards(str(root), tmp_path / "shards", samples_per_shard=400, note=print)
    last = len(meta["shards"]["train"]) - 1
    common = dict(
        model="test_simple_cnn",
        epochs=8,
        batch_size=64,
        lr=0.1,
        input_size=8,
        out_dir=str(tmp_path / "runs"),
        num_workers=0,
    )
    overrides = ["data.hflip=0", "data.pad_crop=0", "train.progress=plain"]
    folder = cnnkit.train(str(root), overrides=[*overrides, "data.val_fraction=0"], **common)
    shards = cnnkit.train(
        str(tmp_path / "shards" / f"train-{{000000..{last:06d}}}.tar"),
        overrides=[*overrides, f"data.test={tmp_path / 'shards' / 'test-000000.tar'}"],
        **common,
    )
    assert folder.test["images"] == shards.test["images"] == 355  # every 5th image per class
    assert folder.test["acc"] > 0.85 and shards.test["acc"] > 0.85
    assert abs(folder.test["acc"] - shards.test["acc"]) < 0.05


def test_shard_dataset_rejects_shards_missing_from_meta(tmp_path):
    with pytest.raises(CnnkitError, match="not listed"):
        ShardDataset([str(tmp_path / "a.tar")], ["x"], {})


def test_alternating_flips_are_refused_for_shards(tmp_path):
    """Shards stream in a new order each epoch and carry no fixed index per image."""
    root = unique_folder(tmp_path / "src")
    write_shards(str(root), tmp_path / "out", note=lambda m: None)
    cfg = DataConfig(source=str(tmp_path / "out" / "train-000000.tar"), hflip="alternate")
    with pytest.raises(CnnkitError, match="alternate.*shards"):
        build(cfg, seed=0)
