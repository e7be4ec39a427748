"""cnnkit.data on real files written by the tests (PNG/JPEG, several sizes and modes) and digits."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.config import DataConfig, from_dict
from cnnkit.data import (
    Augment,
    ImageFileError,
    batch_mix,
    build,
    build_eval,
    eval_transform,
    list_images,
    load_image,
    make_loader,
)
from cnnkit.data.loader import EpochSampler, worker_message
from cnnkit.data.readers import stratified_split
from cnnkit.errors import CnnkitError
from conftest import make_folder

CLASSES = ("cat", "dog", "fox")
SIZES = ((32, 32), (40, 28), (24, 36))  # (W, H) of the images, mixed on purpose


def write_image(path: Path, size=(32, 32), mode="RGB", seed=0) -> Path:
    """A random image in ``mode`` (RGB, L, RGBA, P) saved as PNG or JPEG (by suffix)."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L"))
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_class_folder(
    root: Path, per_class=6, classes=CLASSES, modes=("RGB", "L", "RGBA", "P"), sizes=SIZES, seed=0
) -> Path:
    """root/<class>/<n>.png|jpg with mixed sizes and modes (JPEG only for RGB and L)."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            mode = modes[i % len(modes)]
            suffix = ".jpg" if mode in ("RGB", "L") and i % 2 == 0 else ".png"
            write_image(
                root / name / f"{i}{suffix}", sizes[i % len(sizes)], mode, seed + 100 * c + i
            )
    return root


def cfg_for(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), **kw)


def epochs_of(loader, epochs):
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out.append([(x.clone(), y.clone()) for x, y in loader])
    return out


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        len(ea) == len(eb)
        and all(
            torch.equal(xa, xb) and torch.equal(ya, yb)
            for (xa, ya), (xb, yb) in zip(ea, eb, strict=True)
        )
        for ea, eb in zip(a, b, strict=True)
    )


# --- images.py -------------------------------------------------------------------------------


def test_load_image_modes_alpha_exif_and_16bit(tmp_path):
    for mode in ("RGB", "L", "RGBA", "P"):
        path = write_image(tmp_path / f"{mode}.png", (20, 10), mode)
        assert load_image(path, "RGB").mode == "RGB" and load_image(path, "L").size == (20, 10)
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent -> white
    clear.save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    Image.new("RGB", (30, 10), "red").save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (10, 30)
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    deep.save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png", "L").getpixel((0, 0)) == 255


def test_load_image_errors_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    good = write_image(tmp_path / "cut.jpg", (64, 64))
    (tmp_path / "cut2.jpg").write_bytes(good.read_bytes()[:300])  # truncated JPEG
    for name in ("bad.png", "cut2.jpg", "missing.png"):
        with pytest.raises(ImageFileError, match=name) as info:
            load_image(tmp_path / name)
        assert "\n" not in str(info.value)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(good.read_bytes())
    assert [p.name for p in list_images(tmp_path)] == ["bad.png", "cut.jpg", "cut2.jpg"]


# --- folders ---------------------------------------------------------------------------------


def test_class_folder_mixed_sizes_and_modes(tmp_path):
    root = make_class_folder(tmp_path / "pets")
    splits = build(cfg_for(root, val_fraction=0.34), seed=0)
    assert splits.classes == list(CLASSES) and splits.name == "pets"
    assert splits.in_chans == 3 and splits.input_size == (32, 32)  # median side 28..32 -> 32
    assert len(splits.train) + len(splits.val) == 18 and splits.test is None
    assert sorted(np.bincount(splits.val.targets).tolist()) == [2, 2, 2]  # stratified
    pre = json.loads(json.dumps(splits.preprocessing))
    assert pre["input_size"] == [32, 32] and pre["crop"] == "center" and pre["in_chans"] == 3
    assert all(0.2 < m < 0.8 for m in splits.mean) and all(0.1 < s < 0.5 for s in splits.std)
    for dataset in (splits.train, splits.val):
        for i in range(len(dataset)):
            x, y = dataset[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert splits.augment.pad_crop == 4 and splits.augment.hflip == 0.5


def test_carved_val_is_seeded_and_stratified():
    targets = [0] * 50 + [1] * 30 + [2] * 20
    keep, held = stratified_split(targets, 0.1, seed=3)
    assert stratified_split(targets, 0.1, seed=3) == (keep, held)
    assert stratified_split(targets, 0.1, seed=4)[1] != held
    assert sorted(keep + held) == list(range(100))
    assert np.bincount(np.asarray(targets)[held]).tolist() == [5, 3, 2]
    assert stratified_split([0, 1, 1], 0.5, seed=0)[1] in ([1], [2])  # a single sample stays
    assert stratified_split(targets, 0.0, seed=0) == (list(range(100)), [])


def test_grayscale_folder_gives_one_channel_and_input_size_rule(tmp_path):
    gray = make_class_folder(tmp_path / "gray", per_class=3, modes=("L",), sizes=((60, 70),))
    splits = build(cfg_for(gray, val_fraction=0), seed=0)
    assert splits.in_chans == 1 and splits.input_size == (64, 64) and splits.val is None
    assert splits.train[0][0].shape == (1, 64, 64)
    assert splits.augment.random_resized_crop is True and splits.augment.rrc_scale == (0.25, 1)
    big = make_class_folder(tmp_path / "big", per_class=2, sizes=((120, 90),))
    splits = build(cfg_for(big, val_fraction=0), seed=0)
    assert splits.input_size == (224, 224) and splits.preprocessing["resize"] == 256
    assert splits.train[0][0].shape == (3, 224, 224)
    splits = build(cfg_for(big, val_fraction=0, input_size=48), seed=0)
    assert splits.test is None and splits.train[1][0].shape == (3, 48, 48)


def test_folder_stats_are_the_pixel_statistics(tmp_path):
    for i, value in enumerate((0, 255, 0, 255)):
        path = tmp_path / "bw" / f"c{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (16, 16), value).save(path)
    splits = build(cfg_for(tmp_path / "bw", val_fraction=0), seed=0)
    assert splits.mean == pytest.approx((0.5,)) and splits.std == pytest.approx((0.5,))
    x, _ = splits.train[1]
    assert x.abs().max().item() == pytest.approx(1.0)  # (1 - 0.5) / 0.5


def test_train_val_test_layout_and_build_eval(tmp_path):
    root = tmp_path / "data"
    make_class_folder(root / "train", per_class=4)
    make_class_folder(root / "val", per_class=2, classes=("dog", "cat"), seed=7)
    make_class_folder(root / "test", per_class=1, classes=("fox",), seed=9)
    splits = build(cfg_for(root), seed=0)
    assert splits.name == "data" and len(splits.train) == 12  # nothing carved: val/ exists
    assert sorted(splits.val.targets) == [0, 0, 1, 1] and splits.test.targets == [2]
    assert splits.val[0][0].shape == splits.test[0][0].shape == (3, 32, 32)
    evaluated = build_eval(str(root), ["fox", "dog", "cat"], splits.preprocessing)
    assert evaluated.targets == [0] and evaluated[0][0].shape == (3, 32, 32)  # used test/
    with pytest.raises(CnnkitError, match="fox"):
        build_eval(str(root / "train"), ["cat", "dog"], splits.preprocessing)
    assert build(cfg_for(root), seed=1).fingerprint == splits.fingerprint
    make_class_folder(root / "val", per_class=1, classes=("owl",))
    with pytest.raises(CnnkitError, match="owl"):
        build(cfg_for(root), seed=0)
    shutil.rmtree(root / "val" / "owl")
    write_image(root / "train" / "cat" / "new.png")
    assert build(cfg_for(root), seed=0).fingerprint != splits.fingerprint


def test_csv_with_and_without_header(tmp_path):
    rows = []
    for i in range(8):
        path = write_image(tmp_path / "img" / f"{i}.png", SIZES[i % 3], seed=i)
        rows.append(f"img/{path.name},{['10', '2'][i % 2]}")
    (tmp_path / "train.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "val.csv").write_text("\n".join(rows[:2]))
    splits = build(cfg_for(tmp_path / "train.csv", val=str(tmp_path / "val.csv")), seed=0)
    assert splits.classes == ["2", "10"] and splits.name == "train"  # numeric labels: 2 < 10
    assert len(splits.train) == 8 and splits.val.targets == [1, 0]
    assert splits.train[0][0].shape == (3, 32, 32)
    (tmp_path / "bad_label.csv").write_text("img/0.png,7\n")
    with pytest.raises(CnnkitError, match="7"):
        build(cfg_for(tmp_path / "train.csv", val=str(tmp_path / "bad_label.csv")), seed=0)
    (tmp_path / "missing.csv").write_text("img/0.png,a\nimg/nope.png,b\n")
    with pytest.raises(CnnkitError, match="nope.png"):
        build(cfg_for(tmp_path / "missing.csv"), seed=0)
    ds = build_eval(str(tmp_path / "val.csv"), ["2", "10"], splits.preprocessing)
    assert ds.targets == [1, 0]


@pytest.mark.parametrize(
    "layout, match",
    [
        ("missing", "not found"),
        ("empty", "no images"),
        ("loose", "one subfolder per class"),
        ("empty_class", "empty_class"),
        ("txt", "not a .csv"),
    ],
)
def test_bad_sources_raise_clear_errors(tmp_path, layout, match):
    root = tmp_path / "src"
    if layout == "empty":
        root.mkdir()
    elif layout == "loose":
        write_image(root / "a.png")
    elif layout == "empty_class":
        make_class_folder(root, per_class=2)
        (root / "empty_class").mkdir()
        (root / "empty_class" / "readme.txt").write_text("no images here")
    elif layout == "txt":
        root.mkdir()
        root = root / "list.txt"
        root.write_text("a.png,cat\n")
    with pytest.raises(CnnkitError, match=match):
        build(cfg_for(root), seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_file_met_while_loading_names_the_file(tmp_path, workers):
    root = make_class_folder(tmp_path / "pets", per_class=2, modes=("RGB",))
    splits = build(cfg_for(root, val_fraction=0), seed=0)
    (root / "dog" / "1.png").write_bytes(b"\x89PNG not really")  # broken after build
    loader = make_loader(splits.train, 4, train=True, seed=0, num_workers=workers)
    with pytest.raises(ImageFileError) as info:
        for _ in loader:
            pass
    message = str(info.value)
    assert "1.png" in message and "\n" not in message and "Traceback" not in message
    with pytest.raises(ImageFileError, match="1.png"):  # build's image scan meets it too
        build(cfg_for(root, val_fraction=0), seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_file_turning_bad_in_the_middle_of_training_stops_it_naming_the_file(tmp_path, workers):
    import cnnkit
    from cnnkit.config import resolve as resolve_config
    from cnnkit.engine import runtime
    from cnnkit.engine.checkpoint import load_checkpoint
    from cnnkit.engine.fit import fit

    root = make_class_folder(tmp_path / "pets", per_class=4, modes=("RGB",))
    cfg = resolve_config(str(root), epochs=2, batch_size=4, num_workers=workers)
    cfg.data.decode_cache = "off"  # read from the files at every step, not decoded once
    cfg.train.progress = "plain"
    splits = build(cfg.data, seed=0)
    model = cnnkit.create_model("test_simple_cnn", num_classes=3, in_chans=3)
    run_dir, meta = tmp_path / "run", {"arch": "test_simple_cnn"}
    rt = runtime.resolve(cfg.runtime)
    task = cnnkit.tasks.get("classification")
    fit(model, splits, cfg, run_dir, meta, rt, task, stop_after=1)  # epoch 1 reads every file
    bad = Path(splits.train.paths[2])
    bad.write_bytes(b"\x89PNG\r\n\x1a\n and then nothing an image holds")
    last = run_dir / "checkpoints" / "last.pt"
    with pytest.raises(ImageFileError) as info:
        fit(model, splits, cfg, run_dir, meta, rt, task, resume=load_checkpoint(last))
    message = str(info.value)
    assert str(bad) in message and "\n" not in message and "Traceback" not in message
    assert load_checkpoint(last)["epoch"] == 1  # nothing saved for the epoch it stopped in


def test_worker_message_restores_the_original_line():
    text = (
        "Caught ImageFileError in DataLoader worker process 1.\nOriginal Traceback (most "
        "recent call last):\n  File x\ncnnkit.data.images.ImageFileError: cannot read a.png\n"
    )
    assert worker_message(ImageFileError(text)) == "cannot read a.png"
    assert worker_message(CnnkitError("plain")) == "plain"


# --- built-ins -------------------------------------------------------------------------------


def test_digits_default_split_is_fixed_and_val_is_seeded():
    a, b = build(DataConfig(), seed=0), build(DataConfig(), seed=1)
    assert a.name == "digits" and a.classes == [str(d) for d in range(10)]
    assert a.in_chans == 1 and a.input_size == (8, 8) and len(a.test) == 359
    assert torch.equal(a.test.images, b.test.images) and a.test.targets == b.test.targets
    assert len(a.train) + len(a.val) == 1797 - 359 and a.val.targets != b.val.targets
    assert a.test.images.max() == 255 and a.mean == b.mean  # 0..16 scaled to 0..255
    x = torch.stack([a.train[i][0] for i in range(len(a.train))])
    assert x.shape[1:] == (1, 8, 8) and abs(x.mean().item()) < 0.05
    assert a.augment == Augment(rrc_scale=(0.25, 1.0)) and not a.augment.random
    loader = make_loader(a.train, 128, train=True, seed=0)
    assert loader.num_workers == 0 and len(loader) == len(a.train) // 128
    evaluated = build_eval("digits", a.classes, a.preprocessing)
    assert len(evaluated) == 359 and torch.equal(evaluated[5][0], a.test[5][0])


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_builtin_download_offline_names_the_folder(tmp_path, monkeypatch, name):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cache = tmp_path / "empty cache"
    with pytest.raises(CnnkitError, match=str(cache)) as info:
        build(DataConfig(source=name, cache_dir=str(cache)), seed=0)
    assert "\n" not in str(info.value)


def test_unknown_source_suggests_a_builtin():
    with pytest.raises(CnnkitError, match="cifar10"):
        build(DataConfig(source="cifar-1O"), seed=0)


# --- loaders and transforms ------------------------------------------------------------------


def test_loader_is_exactly_reproducible_across_workers_and_epochs(tmp_path):
    root = make_class_folder(tmp_path / "pets", per_class=5)
    cfg = cfg_for(root, val_fraction=0, auto_augment="trivial", random_erasing=0.5)
    train = build(cfg, seed=0).train
    before = torch.get_rng_state()
    plain = epochs_of(make_loader(train, 4, train=True, seed=5, num_workers=0), [0, 1])
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is untouched
    workers = epochs_of(make_loader(train, 4, train=True, seed=5, num_workers=2), [0, 1])
    assert same_batches(plain, workers)
    resumed = epochs_of(make_loader(train, 4, train=True, seed=5, num_workers=2), [1])
    assert same_batches(plain[1:], resumed)  # epoch 1 without running epoch 0 first
    assert not same_batches(plain[:1], plain[1:])
    other = epochs_of(make_loader(train, 4, train=True, seed=6, num_workers=0), [0])
    assert not same_batches(plain[:1], other)
    assert sum(len(y) for _, y in plain[0]) == 12  # drop_last: 15 samples, batches of 4


def test_epoch_sampler_shards_cover_every_index_once():
    shards = [list(EpochSampler(10, shuffle=True, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    indices = [i for shard in shards for i, epoch in shard]
    assert set(indices) == set(range(10)) and len(indices) == 12  # 2 repeated to even out


def test_eval_loader_keeps_order_and_every_sample():
    splits = build(DataConfig(), seed=0)
    loader = make_loader(splits.test, 100, train=False, seed=0)
    ys = torch.cat([y for _, y in loader])
    assert ys.tolist() == splits.test.targets


def test_eval_transform_on_pil_matches_preprocessing(tmp_path):
    pre = {
        "in_chans": 3,
        "input_size": [64, 64],
        "resize": 73,
        "crop": "center",
        "interpolation": "bilinear",
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    x = eval_transform(pre)(load_image(write_image(tmp_path / "a.jpg", (100, 80))))
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert -2.01 <= x.min().item() and x.max().item() <= 2.01


def test_batch_mix_shapes_and_seed():
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    assert batch_mix(Augment(), 4) is None
    for kw in ({"mixup": 0.2}, {"cutmix": 1.0}, {"mixup": 0.2, "cutmix": 1.0}):
        mix = batch_mix(Augment(**kw), num_classes=4)
        out, soft = mix(images, labels)
        assert out.shape == images.shape and soft.shape == (8, 4)
        assert torch.allclose(soft.sum(1), torch.ones(8))
        again = mix(images, labels, seed=3)
        assert all(
            torch.equal(a, b) for a, b in zip(again, mix(images, labels, seed=3), strict=True)
        )
    with pytest.raises(CnnkitError, match="mixup"):  # refused when the config loads
        from_dict({"data": {"mixup": -1.0}})


def test_given_mean_std_are_used_and_checked(tmp_path):
    from cnnkit.config import DataConfig

    folder = tmp_path / "f"
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        for i in range(6):
            (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), colour).save(folder / f"c{c}" / f"{i}.png")
    splits = build(DataConfig(source=str(folder), mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]), 0)
    assert splits.preprocessing["mean"] == [0.5, 0.5, 0.5]
    x = eval_transform(splits.preprocessing)(Image.new("RGB", (16, 16), (200, 30, 30)))
    assert x[0, 0, 0].item() == pytest.approx((200 / 255 - 0.5) / 0.25, abs=1e-5)
    with pytest.raises(CnnkitError, match="need 3 value"):
        build(DataConfig(source=str(folder), mean=[0.5], std=[0.25]), 0)


def test_subsets_keep_their_transform(tmp_path):
    from cnnkit.data.datasets import FileImageDataset, TensorImageDataset

    def tag(x):
        return ("tagged", x)

    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    memory = TensorImageDataset(images, [0, 1, 0, 1], tag).subset([1, 3])
    assert len(memory) == 2 and memory[0][0][0] == "tagged" and memory.targets == [1, 1]
    root = make_folder(tmp_path / "imgs", per_class=2)
    files = FileImageDataset(sorted(root.rglob("*.*")), [0] * 6, transform=tag).subset([0, 5])
    assert len(files) == 2 and files[1][0][0] == "tagged"
