"""`cnnkit doctor` on a segmentation folder: image/mask pairs written as real files, each problem
made on purpose and found by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.cli.main import run
from cnnkit.data.doctor import summary
from cnnkit.data.doctor_pairs import scan_pairs
from test_segmentation import SHAPES, make_shapes


def _kinds(findings) -> dict[str, str]:
    return {Path(f.path).name: f.kind for f in findings}


def test_doctor_names_every_broken_pair(tmp_path, capsys):
    root = tmp_path / "d"
    make_shapes(root / "train", 8, 16)
    make_shapes(root / "val", 3, 16, seed=1)
    (root / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    train = root / "train"
    (train / "masks" / "s001.png").unlink()  # an image without its mask
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(train / "masks" / "lonely.png")  # orphan
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(train / "masks" / "s002.png")  # 16x12
    values = np.asarray(Image.open(train / "masks" / "s003.png")).copy()
    values[0, :3] = 7  # not a class, not the ignore value
    values[1, :3] = 255  # ignored: fine
    Image.fromarray(values).save(train / "masks" / "s003.png")
    shutil.copy(train / "images" / "s004.png", root / "val" / "images" / "leak.png")
    shutil.copy(train / "masks" / "s004.png", root / "val" / "masks" / "leak.png")

    report = scan_pairs(root)
    errors, warnings = _kinds(report.errors), _kinds(report.warnings)
    assert errors == {
        "s001.png": "missing_mask", "s002.png": "mask_size", "s003.png": "mask_values"
    }  # fmt: skip
    assert warnings["lonely.png"] == "orphan_mask"
    messages = {f.kind: f.message for f in report.errors}
    assert "has values [7] outside the 4 classes" in messages["mask_values"]
    assert "is 16x12 but its image" in messages["mask_size"]
    leaks = [(Path(p["a"]).name, Path(p["b"]).name) for p in report.leaks]
    assert leaks == [("s004.png", "leak.png")]
    assert report.images == 12 and not report.ok
    pixels = report.pixels["train"]
    assert list(pixels) == SHAPES and sum(pixels.values()) == pytest.approx(1.0)
    assert pixels["background"] > 0.5 and report.classes["val"]["background"] == 4

    assert run(["doctor", str(root), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["leaks"] == 1 and data["pixels"]["val"].keys() == set(SHAPES)
    assert run(["doctor", str(root)]) == 1
    out = capsys.readouterr().out
    assert "missing_mask: no mask for image" in out and "orphan_mask" in out


def test_clean_pairs_pass_and_binary_masks_have_two_classes(tmp_path, capsys):
    clean = make_shapes(tmp_path / "clean", 4, 16)
    assert run(["doctor", str(clean)]) == 0
    out = capsys.readouterr().out
    assert "4 images" in out and "pixels background" in out and "clean" in out
    binary = tmp_path / "binary"
    for name in ("images", "masks"):
        (binary / name).mkdir(parents=True)
    for i in range(2):
        mask = np.zeros((8, 8), np.uint8)
        mask[:2, :] = 255  # a quarter foreground
        Image.fromarray(np.full((8, 8), 60 + i, np.uint8)).save(binary / "images" / f"{i}.png")
        Image.fromarray(mask).save(binary / "masks" / f"{i}.png")
    report = scan_pairs(binary)
    assert report.ok and report.pixels["train"] == {"background": 0.75, "foreground": 0.25}
    assert "foreground 25.0%" in summary(report)
