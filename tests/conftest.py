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
