"""cnnkit doctor and the bad-input policy, on a folder of real broken and odd files."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit import data, tasks
from cnnkit.cli.main import run
from cnnkit.config import DataConfig
from cnnkit.config import resolve as resolve_config
from cnnkit.data import build
from cnnkit.data.datasets import FileImageDataset
from cnnkit.data.doctor import check_files, scan, summary
from cnnkit.data.images import ImageFileError, decode, is_image_file
from cnnkit.data.loader import EpochSampler
from cnnkit.engine import runtime
from cnnkit.engine.fit import fit
from conftest import write_image

BAD = {"zero.jpg": "empty", "trunc.jpg": "unreadable", "text.png": "not_image", "bomb.png": "bomb"}
ODD = {
    "cmyk.jpg": "mode",
    "rgba.png": "mode",
    "ptrans.png": "mode",
    "la.png": "mode",
    "deep.png": "mode",
    "rotated.jpg": "exif",
    "tiny.png": "tiny",
    "strip.png": "aspect",
}


def write_png_bomb(path: Path, side: int = 20000) -> None:
    """A valid 1-bit PNG of side x side pixels (400 megapixels) in ~60 KB: a decompression bomb."""
    row = b"\x00" + bytes(side // 8)  # filter byte + a row of black pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def make_sick_folder(root: Path) -> Path:
    """train/{cat,dog} and test/{cat,dog} of good noise images, plus every kind of trouble."""
    for split, count in (("train", 8), ("test", 3)):
        for c, (name, color) in enumerate({"cat": (200, 60, 60), "dog": (60, 60, 200)}.items()):
            for i in range(count):
                seed = c * 100 + i + (50 if split == "test" else 0)
                write_image(root / split / name / f"{i}.png", color, (24, 24), seed=seed)
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    (cat / "zero.jpg").write_bytes(b"")
    write_image(cat / "full.jpg", (200, 60, 60), (64, 64), seed=7)
    (cat / "trunc.jpg").write_bytes((cat / "full.jpg").read_bytes()[:400])
    (cat / "full.jpg").unlink()
    (dog / "text.png").write_text("this is a text file, not a PNG\n")
    write_png_bomb(dog / "bomb.png")
    noise = np.random.default_rng(1).integers(0, 255, (24, 24, 4), dtype=np.uint8)
    Image.fromarray(noise[..., :3]).convert("CMYK").save(cat / "cmyk.jpg")
    Image.fromarray(noise, "RGBA").save(cat / "rgba.png")
    palette = Image.fromarray(noise[..., :3]).convert("P")
    palette.save(dog / "ptrans.png", transparency=0)
    Image.fromarray(noise[..., :2], "LA").save(dog / "la.png")
    Image.fromarray(noise[..., 0].astype(np.uint16) * 257).save(cat / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(noise[..., :3]).resize((40, 24)).save(dog / "rotated.jpg", exif=exif)
    Image.fromarray(noise[:8, :8, :3]).save(dog / "tiny.png")
    Image.fromarray(np.repeat(noise[:20, :, :3], 6, axis=1)).save(cat / "strip.png")  # 144x20
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (dog / ".ipynb_checkpoints").mkdir()
    (root / "test" / "cat" / "leak.png").write_bytes((cat / "0.png").read_bytes())
    Image.open(dog / "1.png").save(root / "test" / "dog" / "near.jpg", quality=90)
    return root


@pytest.fixture
def sick(tmp_path) -> Path:
    return make_sick_folder(tmp_path / "sick")


def _by_name(findings) -> dict[str, str]:
    return {Path(f.path).name: f.kind for f in findings}


def test_doctor_names_every_problem_and_caches(sick):
    report = scan(sick, workers=2)
    errors = _by_name(report.errors)
    assert {name: errors.get(name) for name in BAD} == BAD
    warnings = _by_name(report.warnings)
    assert {name: warnings.get(name) for name in ODD} == ODD
    assert warnings[".DS_Store"] == "junk" and warnings[".ipynb_checkpoints"] == "junk"
    exact = [(Path(p["a"]).name, Path(p["b"]).name, p["cross_split"]) for p in report.leaks]
    assert ("leak.png", "0.png", True) in exact or ("0.png", "leak.png", True) in exact
    near = {(Path(p["a"]).name, Path(p["b"]).name) for p in report.near_duplicates}
    assert ("near.jpg", "1.png") in near or ("1.png", "near.jpg") in near
    assert report.classes["train"] == {"cat": 8 + 4, "dog": 8 + 4}
    assert not report.ok and report.cached == 0
    again = scan(sick)
    assert again.cached == again.images == report.images
    assert _by_name(again.errors) == errors and len(again.leaks) == len(report.leaks)
    (sick / "train" / "cat" / "zero.jpg").write_bytes(
        (sick / "train" / "cat" / "0.png").read_bytes()
    )
    third = scan(sick)
    assert third.cached == report.images - 1 and "zero.jpg" not in _by_name(third.errors)


def test_doctor_cli_exit_codes_and_json(tmp_path, sick, capsys):
    assert run(["doctor", str(sick), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["leaks"] >= 2 and data["images_per_s"] > 0
    assert {Path(e["path"]).name for e in data["errors"]} >= set(BAD)
    clean = tmp_path / "clean"
    for i in range(4):
        write_image(clean / "a" / f"{i}.png", (200, 0, 0), (20, 20), seed=i)
        write_image(clean / "b" / f"{i}.png", (0, 0, 200), (20, 20), seed=10 + i)
    assert run(["doctor", str(clean)]) == 0
    out = capsys.readouterr().out
    assert "8 images" in out and "clean" in out
    (clean / "c").mkdir()
    assert run(["doctor", str(clean)]) == 1
    assert "empty_class" in capsys.readouterr().out


def test_decoding_policy(sick):
    cat, dog = sick / "train" / "cat", sick / "train" / "dog"
    for path in [cat / "cmyk.jpg", cat / "rgba.png", dog / "ptrans.png", dog / "la.png"]:
        image, facts = decode(path)
        assert image.mode == "RGB" and facts["mode"] in {"CMYK", "RGBA", "P", "LA"}
    image, facts = decode(dog / "rotated.jpg")
    assert facts["orientation"] == 6 and (facts["width"], image.width) == (40, 24)
    Image.new("RGBA", (2, 2), (0, 0, 0, 0)).save(cat / "clear.png")
    assert decode(cat / "clear.png")[0].getpixel((0, 0)) == (255, 255, 255)  # fixed background
    ramp = np.array([[0, 257 * 100, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(ramp).save(cat / "ramp.png")
    assert np.asarray(decode(cat / "ramp.png", "L")[0]).tolist() == [[0, 100, 128, 255]]  # scaled
    with pytest.raises(ImageFileError, match="bomb.png"):
        decode(dog / "bomb.png")


def test_preflight_check_skips_perceptual_hashes_and_the_doctor_adds_them(sick):
    images = [p for p in sick.rglob("*") if p.is_file() and is_image_file(p)]
    assert set(_by_name(check_files(images))) == set(BAD)  # decoded, not hashed
    report = scan(sick)
    assert 0 < report.cached < report.images  # the bad files' results are reused
    near = {(Path(p["a"]).name, Path(p["b"]).name) for p in report.near_duplicates}
    assert ("near.jpg", "1.png") in near or ("1.png", "near.jpg") in near


def test_training_stops_on_bad_files_unless_skip_bad(tmp_path, sick, capsys):
    argv = ["train", str(sick), "--epochs", "1", "--quiet", "--num-workers", "0"]
    code = run([*argv, f"train.out_dir={tmp_path}/runs"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert all(name in err for name in BAD) and "--skip-bad" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    result = cnnkit.train(str(sick), epochs=1, out_dir=str(tmp_path / "runs"), skip_bad=True)
    listed = (result.run_dir / "skipped_files.tsv").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in listed) == sorted(BAD)
    assert result.fit.epochs_done == 1


def _pairs(found: list[dict]) -> set[tuple[str, str, bool]]:
    return {(Path(p["a"]).name, Path(p["b"]).name, p["cross_split"]) for p in found}


def test_duplicates_within_one_split_are_reported_but_are_no_leak(tmp_path):
    root = tmp_path / "dups"
    for split, seeds in (("train", range(4)), ("test", range(50, 52))):
        for c, (name, color) in enumerate({"cat": (200, 60, 60), "dog": (60, 60, 200)}.items()):
            for i in seeds:
                write_image(root / split / name / f"{i}.png", color, (32, 32), seed=c * 100 + i)
    train = root / "train"
    (train / "dog" / "copy.png").write_bytes((train / "cat" / "0.png").read_bytes())
    Image.open(train / "cat" / "1.png").save(train / "cat" / "resaved.jpg", quality=90)
    report = scan(root)
    assert _pairs(report.exact_duplicates) == {("0.png", "copy.png", False)}
    assert _pairs(report.near_duplicates) == {("1.png", "resaved.jpg", False)}
    assert report.leaks == [] and report.ok  # a warning: training can still use them
    text = summary(report)
    assert "duplicates within a split: 2" in text and "leakage" not in text
    assert str(train / "cat" / "resaved.jpg") in text


def _smooth_pattern(path: Path, seed: int) -> None:
    """A 48x48 image of smooth random blobs: most of its energy in the low frequencies a
    perceptual hash looks at, so unrelated images are not told apart by noise alone."""
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(coarse).resize((48, 48), Image.Resampling.BICUBIC).save(path)


def test_distinct_images_are_never_called_duplicates(tmp_path):
    root = tmp_path / "distinct"
    for i in range(60):
        _smooth_pattern(root / "train" / f"c{i % 3}" / f"{i}.png", seed=i)
    for i in range(60, 80):
        _smooth_pattern(root / "test" / f"c{i % 3}" / f"{i}.png", seed=i)
    report = scan(root)
    assert report.images == 80 and not report.errors
    assert report.exact_duplicates == [] and report.near_duplicates == []
    assert report.ok and "duplicates" not in summary(report)


def _imbalanced(root: Path) -> Path:
    for c, (name, color, count) in enumerate(
        [("red", (220, 40, 40), 30), ("blue", (40, 60, 220), 6)]
    ):
        for i in range(count):
            write_image(root / name / f"{i}.png", color, (16, 16), seed=c * 100 + i)
    return root


def test_imbalance_is_reported_and_the_weighted_sampler_draws_evenly(tmp_path):
    root = _imbalanced(tmp_path / "skewed")
    report = scan(root)
    assert report.imbalance["train"] == 5.0 and report.balance == "sampler" and report.ok
    sampler = EpochSampler(36, shuffle=True, seed=0, weights=[1 / 30] * 30 + [1 / 6] * 6)
    drawn = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        drawn += [i for i, _ in sampler]
    assert 0.4 < sum(i >= 30 for i in drawn) / len(drawn) < 0.6  # blue drawn half the time


class _Recording(FileImageDataset):
    """The training split as read from its files, noting the class of every image drawn."""

    drawn: list[int] = []

    def __getitem__(self, index: int):
        image, label = super().__getitem__(index)
        self.drawn.append(label)
        return image, label


class _RecordingLoss(torch.nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss, noting the class weights of every call made in a training step."""

    weights: list = []

    def forward(self, logits, targets):
        if torch.is_grad_enabled():  # not evaluation's own (unweighted) loss
            self.weights.append(self.weight)
        return super().forward(logits, targets)


def _fit_with_balance(tmp_path, root: Path, balance: str, capsys):
    """Train 3 epochs with ``balance``: (classes drawn, loss weights, train split, printed)."""
    cfg = resolve_config(
        str(root), epochs=3, batch_size=8, num_workers=0, balance=balance, progress="plain"
    )
    cfg.data.decode_cache = "off"  # stream from the files, so each draw reads the dataset
    splits = data.build(cfg.data, seed=0)
    train = splits.train
    splits.train = _Recording(train.paths, train.targets, train.mode, train.transform)
    _Recording.drawn, _RecordingLoss.weights = [], []
    model = cnnkit.create_model("test_simple_cnn", num_classes=2, in_chans=3)
    rt = runtime.resolve(cfg.runtime)
    task = tasks.get("classification")
    fit(model, splits, cfg, tmp_path / balance, {"arch": "test_simple_cnn"}, rt, task)
    return _Recording.drawn, _RecordingLoss.weights, splits, capsys.readouterr().out


def test_balance_modes_reach_the_sampler_and_the_loss(tmp_path, monkeypatch, capsys):
    root = _imbalanced(tmp_path / "skewed")  # red 30, blue 6 (less the carved validation)
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", _RecordingLoss)
    modes = {"auto": "sampler", "sampler": "sampler", "loss": "loss", "none": "none"}
    for balance, used in modes.items():
        drawn, weights, splits, printed = _fit_with_balance(tmp_path, root, balance, capsys)
        assert f"balance {used}," in printed
        blue = splits.classes.index("blue")
        counts = [splits.train.targets.count(c) for c in range(2)]
        steps = len(splits.train) // 8  # per epoch, the last partial batch dropped
        assert len(drawn) == 3 * steps * 8 and len(weights) == 3 * steps, (len(drawn), steps)
        share = drawn.count(blue) / len(drawn)
        if used == "sampler":  # minority drawn about as often as the majority
            assert 0.35 < share < 0.65, (share, counts)
        else:  # each image once an epoch (32 images: 4 full batches)
            assert sorted(drawn) == sorted(splits.train.targets * 3), (share, counts)
        if used == "loss":  # n / (k * count): inverse frequency, each class weighing the same
            expected = torch.tensor([sum(counts) / (2 * c) for c in counts])
            assert all(w is not None and torch.allclose(w, expected) for w in weights), weights
        else:
            assert all(w is None for w in weights)
        header = (tmp_path / balance / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"val_balanced_acc", "val_recall_red", "val_recall_blue"} <= set(header)


def test_doctor_and_preflight_keep_their_cache_in_the_configured_cache_dir(
    tmp_path, monkeypatch, capsys
):
    """One cache folder: data.cache_dir (or --cache-dir), else $CNNKIT_CACHE_DIR."""
    root = tmp_path / "imgs"
    for i in range(4):
        write_image(root / "a" / f"{i}.png", (200, 0, 0), (20, 20), seed=i)
        write_image(root / "b" / f"{i}.png", (0, 0, 200), (20, 20), seed=10 + i)
    monkeypatch.setenv("CNNKIT_CACHE_DIR", str(tmp_path / "env"))
    assert run(["doctor", str(root), "--cache-dir", str(tmp_path / "given")]) == 0
    assert "8 images" in capsys.readouterr().out
    assert any((tmp_path / "given" / "doctor").iterdir()) and not (tmp_path / "env").exists()
    assert scan(root).cached == 0 and any((tmp_path / "env" / "doctor").iterdir())
    cfg = DataConfig(source=str(root), decode_cache="off", cache_dir=str(tmp_path / "cfg"))
    build(cfg, seed=0)  # streams, so the pre-flight is the doctor's check
    assert any((tmp_path / "cfg" / "doctor").iterdir())
