"""Shared fixtures: tiny image folders written as real PNG/JPEG files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("CNNKIT_TEST", "1")
# the doctor's per-file cache: one throwaway folder per test session, not ~/.cache
os.environ.setdefault("CNNKIT_CACHE_DIR", tempfile.mkdtemp(prefix="cnnkit-test-cache-"))


# flags for a headless browser in a container: no sandbox (root), no GPU, no calls home
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


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
def digits_result(tmp_path_factory):
    """The ``TrainResult`` of the default run, simple_cnn trained 8 epochs on digits (~97% test
    accuracy, report included, ~10 s), trained once and shared: the training, CLI and report
    tests read its run folder, the export/serve tests its model file. Tests that write into the
    folder (exports) use their own file names."""
    import cnnkit

    out = tmp_path_factory.mktemp("deploy-runs")
    return cnnkit.train(
        "digits", model="simple_cnn", epochs=8, out_dir=str(out), num_workers=0, progress="plain"
    )


@pytest.fixture(scope="session")
def shapes_result(tmp_path_factory):
    """The ``TrainResult`` of `cnnkit train DIR` with no flags on 320 synthetic 64x64 shapes
    (test_segmentation.make_shapes: the segmentation defaults, the U-Net, 10 epochs), in fp32
    so every CPU computes the same: ~0.93 mIoU in ~20 s, report included; trained once for the
    segmentation acceptance test and the int8 export test."""
    import cnnkit
    from test_segmentation import make_shapes

    root = tmp_path_factory.mktemp("shapes-runs")
    data = make_shapes(root / "shapes", 320, side=64)
    overrides = ["runtime.precision=fp32"]
    return cnnkit.train(str(data), out_dir=str(root), progress="plain", overrides=overrides)


@pytest.fixture(scope="session")
def digits_model(digits_result) -> Path:
    """model.safetensors of ``digits_result``, inside its run folder."""
    assert digits_result.test["acc"] >= 0.85, digits_result.test
    return digits_result.run_dir / "model.safetensors"


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


def _browser_missing(reason: str) -> None:
    """Skip on a laptop without a browser; fail under CI, where a skip would hide that the pages
    were never tested (the CI script installs Chromium first)."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(
            f"{reason}. CI=true needs the browser tests to run: install Chromium "
            "(apt-get install chromium) or set CNNKIT_CHROMIUM to a Chromium binary.",
            pytrace=False,
        )
    pytest.skip(reason)


def _chromium_path(playwright) -> tuple[str | None, list[str]]:
    """The Chromium binary to drive, and where we looked. CNNKIT_CHROMIUM, when set, is the only
    place looked at, so a run can name its browser (or a missing one, to test the failure)."""
    override = os.environ.get("CNNKIT_CHROMIUM")
    if override:
        places = [override]
    else:  # the system package, then PATH, then `python -m playwright install chromium`
        places = [
            "/usr/bin/chromium",
            shutil.which("chromium"),
            playwright.chromium.executable_path,
        ]
    places = list(dict.fromkeys(p for p in places if p))  # which() often finds /usr/bin again
    return next((p for p in places if os.path.isfile(p)), None), places


@pytest.fixture
def chromium():
    """A headless Chromium launched through Playwright, closed after the test."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _browser_missing("playwright (python) is not installed (it is in the 'dev' extra)")
    with sync_playwright() as p:
        executable, places = _chromium_path(p)
        if executable is None:
            _browser_missing(f"no Chromium browser found (looked at {', '.join(places)})")
        browser = p.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def assert_same_checkpoints(a_dir: Path, b_dir: Path, epoch: int) -> dict:
    """Two runs' last checkpoints are at ``epoch`` with bit-equal weights (and EMA weights when
    kept) and the same history, wall-clock fields aside: what an exact resume must give.
    Returns the first checkpoint."""
    from cnnkit.engine.checkpoint import load_checkpoint

    a = load_checkpoint(Path(a_dir) / "checkpoints/last.pt")
    b = load_checkpoint(Path(b_dir) / "checkpoints/last.pt")
    assert a["epoch"] == b["epoch"] == epoch
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in (a["ema"] or {"module": {}})["module"]:
        assert torch.equal(a["ema"]["module"][key], b["ema"]["module"][key]), key
    timing = {"epoch_time", "images_per_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    return a
