"""Grad-CAM and Grad-CAM++: the map finds the patch that decides the class, works for every zoo
model and adapted torchvision/timm models, in channels-last and mixed precision, and `explain`
writes overlays."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cnnkit import create_model, list_models
from cnnkit.cli.main import run as cli
from cnnkit.evaluation.gradcam import METHODS, compute_cams
from cnnkit.modelfile import save_model_file

SIZE, PATCH = 32, 12
CORNERS = [(3, 3), (17, 17), (3, 17), (17, 3)]  # top-left of the patch that marks each class
CLASSES = ["top-left", "bottom-right", "top-right", "bottom-left"]


def patch_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images (n, 1, 32, 32); class c has a bright 12x12 patch at CORNERS[c].

    Four classes, not two: with two, the evidence for one class can be the *absence* of the
    other's patch, and Grad-CAM rightly shows that instead (its peak then lies elsewhere).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.6
    y = torch.randint(0, len(CORNERS), (n,), generator=g)
    for i, c in enumerate(y.tolist()):
        top, left = CORNERS[c]
        x[i, 0, top : top + PATCH, left : left + PATCH] += 1.0
    return (x - 0.5) / 0.5, y


@pytest.fixture(scope="module")
def patch_model():
    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=len(CORNERS), in_chans=1)
    x, y = patch_images(512, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        batch = slice((step * 64) % 512, (step * 64) % 512 + 64)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test_x, test_y = patch_images(64, seed=2)
    assert (model(test_x).argmax(1) == test_y).float().mean() > 0.95
    return model, test_x, test_y


@pytest.mark.parametrize("method", list(METHODS))
def test_map_peaks_in_the_patch_that_decides_the_class(patch_model, method):
    model, x, y = patch_model
    cams = compute_cams(model, x, y, method=method)
    assert cams.maps.shape == (len(x), SIZE, SIZE)
    assert cams.maps.amin() >= 0 and cams.maps.amax() <= 1
    for cam, label in zip(cams.maps, y.tolist(), strict=True):
        assert cam.std() > 0.05, "the map must not be constant"
        row, col = divmod(int(cam.argmax()), SIZE)
        top, left = CORNERS[label]
        assert top <= row < top + PATCH and left <= col < left + PATCH, (label, row, col)


def test_batched_channels_last_and_bf16_agree(patch_model):
    model, x, y = patch_model
    reference = compute_cams(model, x, y).maps
    one_by_one = torch.cat([compute_cams(model, x[i : i + 1], y[i : i + 1]).maps for i in range(8)])
    assert torch.allclose(reference[:8], one_by_one, atol=1e-5)
    cl_model = model.to(memory_format=torch.channels_last)
    cl = compute_cams(cl_model, x.contiguous(memory_format=torch.channels_last), y).maps
    assert torch.allclose(reference, cl, atol=1e-4)
    model.to(memory_format=torch.contiguous_format)
    bf16 = compute_cams(model, x, y, autocast=torch.autocast("cpu", dtype=torch.bfloat16)).maps
    assert bf16.dtype == torch.float32
    assert (bf16 - reference).abs().mean() < 0.05
    for cam, label in zip(bf16, y.tolist(), strict=True):
        row, col = divmod(int(cam.argmax()), SIZE)
        top, left = CORNERS[label]
        assert top <= row < top + PATCH and left <= col < left + PATCH


def test_model_is_left_as_it_was(patch_model):
    model, x, y = patch_model
    model.train()
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compute_cams(model, x[:4])
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", list_models(include_test=True, task="classification"))
def test_every_zoo_model(name):
    model = create_model(name, num_classes=3).eval()
    cams = compute_cams(model, torch.randn(2, 3, 32, 32), method="gradcam++")
    assert cams.maps.shape == (2, 32, 32) and torch.isfinite(cams.maps).all()
    assert cams.targets.shape == (2,) and cams.probs.shape == (2, 3)


@pytest.mark.parametrize("name", ["tv:resnet18", "tv:mobilenet_v3_small", "timm:resnet18"])
def test_adapted_models(name):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    model = create_model(name, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    for method in METHODS:
        cams = compute_cams(model, x, method=method)
        assert cams.maps.shape == (2, 64, 64) and torch.isfinite(cams.maps).all()


@pytest.fixture
def patch_model_file(patch_model, tmp_path):
    model, _, _ = patch_model
    pre = {
        "in_chans": 1, "input_size": [SIZE, SIZE], "resize": SIZE, "crop": "none",
        "interpolation": "bilinear", "mean": [0.5], "std": [0.5],
    }  # fmt: skip
    meta = {
        "arch": "simple_cnn", "kwargs": {}, "num_classes": 4, "in_chans": 1,
        "classes": CLASSES, "input_size": [SIZE, SIZE], "mean": [0.5],
        "std": [0.5], "preprocessing": pre,
    }  # fmt: skip
    path = tmp_path / "model.safetensors"
    save_model_file(path, model.state_dict(), meta)
    return path


def test_explain_writes_overlays(patch_model_file, tmp_path, capsys):
    x, y = patch_images(3, seed=5)
    files = []
    for i in range(3):
        pixels = ((x[i, 0] * 0.5 + 0.5).clamp(0, 1) * 255).round().byte().numpy()
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(pixels, mode="L").save(files[-1])
    out = tmp_path / "cams"
    args = ["explain", str(patch_model_file), *map(str, files), "--out", str(out)]
    assert cli([*args, "--method", "gradcam++"]) == 0
    printed = capsys.readouterr().out
    for i, label in enumerate(y.tolist()):
        overlay = Image.open(out / f"img{i}.gradcampp.png")
        assert overlay.mode == "RGB" and overlay.size == (224, 224)
        assert CLASSES[label] in printed.splitlines()[i]
    assert cli([*args, "--class", "bottom-right"]) == 0
    assert all("bottom-right" in line for line in capsys.readouterr().out.splitlines())


def test_explain_bad_input_gives_one_line_errors(patch_model_file, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert cli(["explain", str(patch_model_file), str(broken), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.png" in err and len(err.splitlines()) == 1
    good = tmp_path / "good.png"
    Image.new("L", (32, 32)).save(good)
    assert cli(["explain", str(patch_model_file), str(good), "--class", "middle"]) == 2
    assert "'middle' is not one of the model's classes" in capsys.readouterr().err
    assert cli(["explain", str(patch_model_file), str(good), "--method", "cam"]) == 2
    assert "unknown CAM method 'cam'" in capsys.readouterr().err
