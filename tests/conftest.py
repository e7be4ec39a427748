"""Shared fixtures: tiny image folders written as real PNG/JPEG files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("CNNKIT_TEST", "1")
# the doctor's per-file cache: one throwaway folder per test session, not ~/.cache
os.environ.setdefault("CNNKIT_CACHE_DIR", tempfile.mkdtemp(prefix="cnnkit-test-cache-"))


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int], seed: int) -> None:
    """An image of one dominant colour with noise, so classes are learnable but not trivial."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(color, 40, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def make_folder(root: Path, per_class: int = 12, layout: str = "flat") -> Path:
    """Classes red/green/blue; PNG and JPEG of several sizes. layout: flat | split."""
    sizes = [(24, 24), (32, 28), (40, 40), (20, 30)]
    for c, (name, color) in enumerate(COLORS.items()):
        for i in range(per_class):
            ext = "png" if i % 2 else "jpg"
            split = ""
            if layout == "split":
                split = "test/" if i % 4 == 3 else "train/"
            write_image(root / f"{split}{name}/{i}.{ext}", color, sizes[i % 4], seed=c * 1000 + i)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "images")


@pytest.fixture
def split_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "split", per_class=16, layout="split")


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory) -> Path:
    """model.safetensors of simple_cnn trained 4 epochs on digits (~94% test accuracy, ~10 s),
    inside its run folder, shared by the export/serve tests."""
    import cnnkit

    out = tmp_path_factory.mktemp("deploy-runs")
    result = cnnkit.train(
        "digits", model="simple_cnn", epochs=4, out_dir=str(out), num_workers=0, progress="plain"
    )
    assert result.test["acc"] >= 0.85, result.test
    return result.run_dir / "model.safetensors"


@pytest.fixture(scope="session")
def digit_pngs(tmp_path_factory) -> list[tuple[Path, int]]:
    """The first 40 test-split digits as 8x8 grayscale PNG files, with their labels."""
    from cnnkit.data.builtins import load_digits

    folder = tmp_path_factory.mktemp("digit-pngs")
    _, (images, targets), _ = load_digits()
    files = []
    for i in range(40):
        image, label = images[i, 0].numpy(), targets[i]
        path = folder / f"{i:02d}_{label}.png"
        Image.fromarray(image).save(path)  # uint8 (8, 8): mode L
        files.append((path, label))
    return files
