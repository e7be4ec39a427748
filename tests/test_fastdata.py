"""The fast data path: batched augmentation, the in-memory loader and the decode-once cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import cnnkit
from cnnkit.config import DataConfig
from cnnkit.data import Augment, build, make_loader
from cnnkit.data.batchaug import BatchAugment
from cnnkit.data.cache import decoded_images, geometry_ops, stored_geometry
from cnnkit.data.images import ImageFileError, load_image
from cnnkit.data.memory import MemoryLoader, run_loader
from conftest import make_folder

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(-1, 1, 1)
    std = torch.tensor(STD).view(-1, 1, 1)
    return x.float().mul(1.0 / (255.0 * std)).sub_(mean / std)


def random_batch(b=16, h=32, w=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("pad_mode", ["zero", "reflect"])
def test_pad_crop_flip_cutout_equal_a_per_image_reference(pad_mode):
    aug = Augment(pad_crop=4, pad_mode=pad_mode, hflip=0.5, cutout=8)
    batch_aug = BatchAugment(aug, MEAN, STD, (32, 32), seed=3)
    images = random_batch()
    params = batch_aug.draw(images.shape, torch.arange(16), epoch=2, step=5, device="cpu")
    out = batch_aug.apply(images, params)
    assert params["flip"].any() and not params["flip"].all()
    for i in range(16):
        mode = "reflect" if pad_mode == "reflect" else "constant"
        x = F.pad(images[i : i + 1].float(), (4, 4, 4, 4), mode=mode)[0]
        dy, dx = params["shift"][i].tolist()
        x = x[:, dy : dy + 32, dx : dx + 32]
        if params["flip"][i]:
            x = x.flip(2)
        x = normalise(x)
        cy, cx = params["cutout"][i].tolist()
        x[:, max(cy - 4, 0) : cy + 4, max(cx - 4, 0) : cx + 4] = 0
        torch.testing.assert_close(out[i], x, rtol=0, atol=0)


def test_random_resized_crop_equals_crop_then_bilinear_resize():
    batch_aug = BatchAugment(
        Augment(random_resized_crop=True, rrc_scale=(0.25, 1.0)), MEAN, STD, (24, 24), seed=1
    )
    images = random_batch(b=12, h=40, w=56)
    params = batch_aug.draw(images.shape, torch.arange(12), epoch=0, step=0, device="cpu")
    out = batch_aug.apply(images, params)
    boxes = params["box"].long()
    assert (boxes[:, 2] >= 1).all() and (boxes[:, 0] + boxes[:, 2] <= 40).all()
    assert (boxes[:, 3] >= 1).all() and (boxes[:, 1] + boxes[:, 3] <= 56).all()
    assert len({tuple(b) for b in boxes.tolist()}) > 6  # boxes differ between images
    for i in range(12):
        top, left, h, w = boxes[i].tolist()
        crop = images[i : i + 1, :, top : top + h, left : left + w].float()
        ref = F.interpolate(crop, size=(24, 24), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(out[i], normalise(ref), rtol=0, atol=1e-3)


def test_alternating_flip_shows_each_image_both_ways_every_two_epochs():
    batch_aug = BatchAugment(Augment(hflip="alternate"), MEAN, STD, (32, 32), seed=0)
    index = torch.arange(1000)
    flips = [batch_aug.draw((1000, 3, 32, 32), index, e, 0, "cpu")["flip"] for e in range(4)]
    assert 400 < flips[0].sum() < 600  # a fair coin per image in the first epoch
    assert torch.equal(flips[1], ~flips[0]) and torch.equal(flips[2], flips[0])
    assert torch.equal(flips[3], ~flips[0])


def test_draws_depend_only_on_seed_epoch_step():
    aug = Augment(pad_crop=2, hflip=0.5, cutout=4)
    a, b = (
        BatchAugment(aug, MEAN, STD, (32, 32), seed=7),
        BatchAugment(aug, MEAN, STD, (32, 32), seed=7),
    )
    images, index = random_batch(), torch.arange(16)
    assert torch.equal(a(images, index, 1, 2), b(images, index, 1, 2))
    assert not torch.equal(a(images, index, 1, 2), a(images, index, 1, 3))


def test_memory_loader_visits_the_same_batches_as_the_dataloader():
    images = random_batch(b=50, h=8, w=8)
    targets = list(range(50))
    normalise_only = BatchAugment(None, MEAN, STD, (8, 8))
    memory = MemoryLoader(images, targets, 8, normalise_only, train=True, seed=4, device="cpu")
    from cnnkit.data.datasets import TensorImageDataset

    loader = make_loader(TensorImageDataset(images, targets), 8, train=True, seed=4)
    for epoch in (0, 3):
        memory.set_epoch(epoch)
        loader.set_epoch(epoch)
        ours = [y.tolist() for _, y in memory]
        theirs = [y.tolist() for _, y in loader]
        assert ours == theirs and len(ours) == len(memory) == 6  # 50 // 8, last batch dropped
    first_images, first_labels = next(iter(memory))
    torch.testing.assert_close(first_images, normalise(images[first_labels]))


def write_folder(root, n=12, size=(20, 16)):
    for i in range(n):
        color = (i * 20 % 256, 255 - i * 15, 90)
        path = root / ("a" if i % 2 else "b") / f"{i}.{'png' if i % 3 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, color).save(path)
    return sorted(root.rglob("*.*"))


def test_decode_cache_matches_per_file_decoding_and_is_reused(tmp_path):
    paths = write_folder(tmp_path / "img")
    pre = {"input_size": [12, 12], "resize": 12, "crop": "none", "interpolation": "bilinear"}
    geometry = stored_geometry(pre, random_resized_crop=False)
    notes: list[str] = []
    cold = decoded_images(paths, "RGB", geometry, tmp_path / "cache", workers=2, note=notes.append)
    assert cold.shape == (12, 3, 12, 12) and cold.dtype == torch.uint8
    ops = geometry_ops(geometry)
    for i, path in enumerate(paths):
        expected = torch.from_numpy(np.array(ops(load_image(path)))).permute(2, 0, 1)
        assert torch.equal(cold[i], expected)
    assert any("decoding 12 images" in n for n in notes)
    files = sorted((tmp_path / "cache" / "decoded").iterdir())
    # the array and its list of failures (empty); no temporary file left behind
    assert [f.suffix for f in files] == [".json", ".npy"] and files[0].stem == files[1].stem

    notes.clear()
    warm = decoded_images(paths, "RGB", geometry, tmp_path / "cache", workers=2, note=notes.append)
    assert torch.equal(warm, cold) and notes == []  # read back, nothing decoded

    before = paths[0].stat().st_mtime_ns
    Image.new("RGB", (20, 16), (1, 2, 3)).save(paths[0])  # same size on disk may differ: mtime
    os.utime(paths[0], ns=(before + 10**9, before + 10**9))  # a later mtime, whatever the clock
    changed = decoded_images(
        paths, "RGB", geometry, tmp_path / "cache", workers=1, note=notes.append
    )
    assert any("decoding" in n for n in notes)
    assert changed[0, :, 0, 0].tolist() == [1, 2, 3] and torch.equal(changed[1:], cold[1:])
    assert len(list((tmp_path / "cache" / "decoded").iterdir())) == 4


def test_the_decode_once_pass_is_the_preflight_check_cold_and_warm(tmp_path, monkeypatch):
    """Files that are decoded once are checked by that decode (no second pass through the
    doctor); its failures are kept with the cache, so a warm start stops or skips the same files."""
    monkeypatch.setenv("CNNKIT_CACHE_DIR", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "imgs", per_class=6)
    bad = root / "green" / "zz-truncated.png"
    bad.write_bytes((root / "green" / "1.png").read_bytes()[:60])
    cfg = DataConfig(source=str(root), val_fraction=0.25, skip_bad=True)
    builds = []
    for _ in range(2):  # cold, then warm
        notes: list[str] = []
        splits = build(cfg, seed=0, note=notes.append)
        builds.append((splits, notes))
    (cold, cold_notes), (warm, warm_notes) = builds
    assert any("decoding" in n for n in cold_notes) and warm_notes == []
    for splits in (cold, warm):
        assert [(f.path, f.kind) for f in splits.skipped] == [(str(bad), "unreadable")]
        assert len(splits.train) + len(splits.val) == 18
        assert str(bad) not in map(str, splits.train.paths + splits.val.paths)
        assert splits.train.decoded.images.shape[0] == len(splits.train)
    assert torch.equal(cold.train.decoded.images, warm.train.decoded.images)
    assert cold.mean == warm.mean
    assert not (tmp_path / "cache" / "doctor").exists()  # checked by the decode pass alone
    cfg.skip_bad = False
    with pytest.raises(ImageFileError, match="zz-truncated.png"):
        build(cfg, seed=0, note=lambda n: None)


def test_folder_loader_is_in_memory_within_budget_and_streams_above(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=6)
    cfg = DataConfig(source=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.0)
    splits = build(cfg, seed=0)
    kw = dict(train=True, seed=0, device=torch.device("cpu"), note=lambda m: None)
    fast = run_loader(splits.train, splits.preprocessing, splits.augment, cfg, 4, **kw)
    assert isinstance(fast, MemoryLoader)
    assert splits.train.decoded is not None  # decoded once by build, which checked every file
    cfg.cache_memory = 0.0
    splits = build(cfg, seed=0)
    assert splits.train.decoded is None
    slow = run_loader(splits.train, splits.preprocessing, splits.augment, cfg, 4, **kw)
    assert not isinstance(slow, MemoryLoader)
    cfg.cache_memory, cfg.auto_augment = None, "trivial"  # per-sample only: DataLoader, in memory
    splits = build(cfg, seed=0)
    mixed = run_loader(splits.train, splits.preprocessing, splits.augment, cfg, 4, **kw)
    assert not isinstance(mixed, MemoryLoader)
    assert type(mixed.dataset.dataset).__name__ == "TensorImageDataset"
    x, _ = next(iter(mixed))
    assert x.shape == (4, 3, *splits.input_size)


def test_training_from_the_decode_cache_equals_training_from_files(tmp_path):
    """Without random augmentation both paths feed bit-identical batches: identical weights."""
    root = make_folder(tmp_path / "imgs", per_class=8)
    weights = []
    for mode in ("on", "off"):
        result = cnnkit.train(
            str(root),
            model="test_simple_cnn",
            epochs=2,
            batch_size=8,
            out_dir=str(tmp_path / "runs"),
            overrides=[
                f"data.decode_cache={mode}",
                f"data.cache_dir={tmp_path / 'cache'}",
                "data.hflip=0",
                "data.pad_crop=0",
                "train.progress=plain",
            ],
        )
        weights.append(load_file(result.run_dir / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
