"""A segmentation run after training: its report, its exports (ONNX, TorchScript) with per-pixel
parity, and `cnnkit serve` answering with mask PNGs, on one tiny run of the synthetic shapes of
test_segmentation."""

from __future__ import annotations

import base64
import copy
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import cnnkit
from cnnkit.cli.main import run
from cnnkit.deploy import export as export_mod
from cnnkit.errors import CnnkitError
from test_segmentation import FAST, SHAPES, make_shapes

SECTIONS = [
    "summary", "curves", "per-class", "confusion", "overlays", "worst", "model", "config",
    "environment",
]  # fmt: skip


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory) -> Path:
    """test_unet trained 3 epochs on 40 shapes at 24 px (~5 s); training writes the report."""
    root = tmp_path_factory.mktemp("seg")
    data = make_shapes(root / "shapes", 40, side=24, seed=7)
    result = cnnkit.train(
        str(data), model="test_unet", epochs=3, batch_size=8, lr=0.02, out_dir=str(root),
        overrides=[*FAST, "model.kwargs={width: 8}"],
    )  # fmt: skip
    return result.run_dir


def _data_images(html: str) -> list[Image.Image]:
    found = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in found]


def test_training_writes_a_segmentation_report(shapes_run):
    html = (shapes_run / "report.html").read_text()
    assert re.findall(r'<section id="([^"]+)">', html) == SECTIONS
    assert "mean IoU" in html and "pixel accuracy" in html
    for name in SHAPES:  # the per-class table
        assert f"<td>{name}</td>" in html, name
    assert "<script" not in html and "http://" not in html and "https://" not in html
    images = _data_images(html)
    assert len(images) == 5  # curves, IoU bars, confusion, overlays, worst
    for image in images:
        image.load()
        assert image.width >= 300 and image.height >= 100, image.size
    # overlays: 6 images x (image, truth, prediction) in rows of 6 tiles of 112 px + captions
    with Image.open(shapes_run / "overlays.png") as overlays:
        assert overlays.width >= 6 * 112 and overlays.height >= 3 * 112
    assert not (shapes_run / "reliability.png").exists()  # classification's figures: none


def test_report_command_rebuilds_it_elsewhere(shapes_run, tmp_path):
    from cnnkit.cli.main import run as cli

    assert cli(["report", str(shapes_run), "--out", str(tmp_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    assert re.findall(r'<section id="([^"]+)">', html) == SECTIONS
    for name in ("curves.png", "iou.png", "confusion.png", "overlays.png", "worst.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and min(image.size) > 100, name
    assert np.asarray(Image.open(tmp_path / "worst.png")).std() > 10  # not a blank page


# --------------------------------------------------------------------------------------------
# Export with per-pixel parity


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_predict_the_same_masks(shapes_run, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX export needs the 'export' extra")
    result = export_mod.export(shapes_run, fmt, out=tmp_path / f"model{export_mod.SUFFIXES[fmt]}")
    parity = result.parity
    assert parity.passed and parity.pixels == parity.images * 24 * 24 and parity.images == 8
    assert parity.agreement >= 0.999 and parity.relative_diff <= export_mod.FP32_TOLERANCE
    exported = cnnkit.load_model(result.path)
    assert exported.meta["task"] == "segmentation" and exported.meta["classes"] == SHAPES
    images = sorted((shapes_run.parent / "shapes" / "images").glob("*.png"))[:6]
    big = tmp_path / "big.png"  # another size than trained: masks come back at the image's size
    Image.open(images[0]).resize((37, 30)).save(big)
    inputs = [*map(str, images), str(big)]
    eager = cnnkit.predict(shapes_run, inputs, mask_dir=tmp_path / "eager", device="cpu")
    got = cnnkit.predict(result.path, inputs, mask_dir=tmp_path / "got", device="cpu")
    same = total = 0
    for a, b in zip(eager, got, strict=True):
        assert a["size"] == b["size"]
        mask_a, mask_b = np.asarray(Image.open(a["mask"])), np.asarray(Image.open(b["mask"]))
        same, total = same + (mask_a == mask_b).sum(), total + mask_a.size
    assert got[-1]["size"] == [37, 30] and same / total >= 0.999, same / total


def test_int8_export_agrees_per_pixel(shapes_result, tmp_path, monkeypatch):
    """Static int8 ONNX of a trained U-Net (the 64 px shapes run with no flags): calibrated on
    training images, gated on the share of validation pixels whose class matches the fp32
    model's (>= 99%). (A barely trained net, as in ``shapes_run``, is refused: 98.7%.)"""
    pytest.importorskip("onnxruntime", reason="int8 export needs the 'export' extra")
    run = shapes_result.run_dir
    work = tmp_path / "cwd"  # ORT once dumped its shape-inference files here
    work.mkdir()
    monkeypatch.chdir(work)
    result = export_mod.export(run, "int8", out=tmp_path / "model.int8.onnx")
    assert not list(work.iterdir())
    parity = result.parity
    assert parity.passed and parity.pixels == parity.images * 64 * 64
    assert parity.agreement >= export_mod.INT8_MIN_AGREEMENT
    exported = cnnkit.load_model(result.path)
    assert exported.meta["task"] == "segmentation"
    images = sorted((run.parent / "shapes" / "images").glob("*.png"))[:6]
    eager = cnnkit.predict(run, list(map(str, images)), device="cpu")
    got = cnnkit.predict(result.path, list(map(str, images)), device="cpu")
    assert [a["size"] for a in eager] == [b["size"] for b in got]
    for a, b in zip(eager, got, strict=True):  # class shares within a point of fp32's
        assert all(abs(a["fractions"][c] - b["fractions"][c]) <= 0.01 for c in SHAPES)


def test_export_below_pixel_agreement_is_refused(shapes_run, monkeypatch):
    """The file written from a model whose head favours one class: its masks differ from the
    model file's on many pixels, so nothing is written."""
    write = export_mod.WRITERS["torchscript"]

    def write_changed(model, path, images):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.get_classifier().fc.bias[2] += 2.0  # more squares
        return write(other, path, images)

    monkeypatch.setitem(export_mod.WRITERS, "torchscript", write_changed)
    target = shapes_run / "refused.torchscript.pt"
    with pytest.raises(CnnkitError, match="failed its parity check") as info:
        export_mod.export(shapes_run, "torchscript", out=target)
    assert "per-pixel agreement below 99.9%" in str(info.value)
    assert "nothing was written" in str(info.value) and not target.exists()


@pytest.mark.parametrize(("agreement", "passed"), [(0.999, True), (0.9989, False)])
def test_pixel_agreement_gate(agreement, passed):
    parity = export_mod.Parity(0.0, 1.0, agreement, 10, 0.9, 0.9, pixels=10_000)
    export_mod._judge(parity, "onnx")
    assert parity.passed is passed


# --------------------------------------------------------------------------------------------
# cnnkit serve: mask PNGs over real HTTP, and the page's overlay


@pytest.fixture(scope="module")
def seg_server(shapes_run):
    pytest.importorskip("httpx", reason="server tests need httpx (the 'dev' extra)")
    pytest.importorskip("fastapi", reason="server tests need the 'serve' extra")
    from test_serve import Server

    server = Server(shapes_run / "model.safetensors")
    yield server
    server.stop()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_serve_answers_with_mask_pngs(shapes_run, seg_server, tmp_path):
    import httpx

    source = sorted((shapes_run.parent / "shapes" / "images").glob("*.png"))[1]
    path = tmp_path / "odd.png"  # not the trained 24x24: the mask comes back at 40x30
    Image.open(source).resize((40, 30)).save(path)
    (expected,) = cnnkit.predict(shapes_run, [str(path)], mask_dir=tmp_path / "m", device="cpu")
    truth = np.asarray(Image.open(expected["mask"]))
    url = seg_server.url + "/predict"
    raw = httpx.post(url + "?format=png", content=path.read_bytes())
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png", raw.text
    with Image.open(io.BytesIO(raw.content)) as mask:
        assert mask.mode == "P" and mask.size == (40, 30)
        assert np.array_equal(np.asarray(mask), truth)
    answer = httpx.post(url + "?overlay=true", files={"file": ("odd.png", path.read_bytes())})
    assert answer.status_code == 200, answer.text
    (result,) = answer.json()["results"]
    assert result["name"] == "odd.png" and result["size"] == [40, 30]
    assert result["fractions"] == pytest.approx(expected["fractions"])
    mask = Image.open(io.BytesIO(base64.b64decode(result["mask_png"])))
    assert np.array_equal(np.asarray(mask), truth)
    overlay = Image.open(io.BytesIO(base64.b64decode(result["overlay_png"])))
    assert overlay.mode == "RGB" and overlay.size == (40, 30)
    assert httpx.get(seg_server.url + "/metadata").json()["task"] == "segmentation"
    two = [("f", (f"{i}.png", path.read_bytes())) for i in range(2)]
    refused = httpx.post(url + "?format=png", files=two)
    assert refused.status_code == 400 and "one image" in refused.json()["error"]


def test_page_shows_the_mask_overlay(shapes_run, seg_server, tmp_path, chromium):
    source = sorted((shapes_run.parent / "shapes" / "images").glob("*.png"))[2]
    page = chromium.new_page()
    page.goto(seg_server.url + "/")
    page.wait_for_selector("#model:has-text('segmentation')")
    page.set_input_files("#file", str(source))
    page.wait_for_selector("#overlay:not([hidden])")
    page.wait_for_function("document.getElementById('overlay').naturalWidth > 0")
    size = page.eval_on_selector("#overlay", "i => [i.naturalWidth, i.naturalHeight]")
    labels = page.locator("#bars .label").all_inner_texts()
    assert size == [24, 24] and sorted(labels) == sorted(SHAPES)
    assert page.locator("#title").inner_text() == "cnnkit segmentation"


def test_lone_model_file_exports_against_given_pairs(shapes_run, tmp_path):
    """A model file outside its run checks parity on --data pairs, decoded at the model's input
    size and normalised as it trained (another size here: 30x30 images)."""
    lone = tmp_path / "model.safetensors"
    shutil.copy(shapes_run / "model.safetensors", lone)
    with pytest.raises(CnnkitError, match="--data"):
        export_mod.export(lone, "torchscript")
    pairs = make_shapes(tmp_path / "pairs", 5, side=30, seed=11)
    result = export_mod.export(lone, "torchscript", data_source=str(pairs))
    assert result.parity.passed and result.parity.images == 5
    assert result.parity.pixels == 5 * 24 * 24 and result.path == tmp_path / "model.torchscript.pt"
    score = cnnkit.evaluate(result.path, str(pairs), device="cpu")
    assert score["images"] == 5 and 0.0 < score["miou"] <= 1.0


def test_eval_prints_pixel_scores_and_explain_refuses(shapes_run, capsys):
    """`cnnkit eval` on a segmentation run prints mIoU, Dice, pixel accuracy, per-class IoU and
    the pixel confusion; `cnnkit explain` (Grad-CAM of a class) says what to use instead."""
    assert run(["eval", str(shapes_run)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"split val: \d+ images  mIoU 0\.\d{4}  dice 0\.\d{4}  pixel acc", out)
    assert "pixel confusion matrix" in out and all(name in out for name in SHAPES)
    image = next((shapes_run.parent / "shapes" / "images").glob("*.png"))
    assert run(["explain", str(shapes_run), str(image)]) == 2  # a usage error, not a crash
    err = capsys.readouterr().err
    assert "segmentation model" in err and "cnnkit predict" in err and "Traceback" not in err


def test_lr_auto_sweeps_the_segmentation_loss(tmp_path, capsys):
    """`--lr auto` and `cnnkit lr-find` on image/mask folders: the sweep runs the task's loss
    on its pairs, and the run trains at the suggestion."""
    data = make_shapes(tmp_path / "shapes", 16, side=24)
    result = cnnkit.train(
        str(data), model="test_unet", epochs=1, lr="auto", out_dir=str(tmp_path),
        overrides=["train.progress=plain", "train.report=false", "runtime.threads=1"],
    )  # fmt: skip
    found = re.search(r"lr finder: suggested lr ([0-9.e-]+)", capsys.readouterr().out)
    lr = yaml.safe_load((result.run_dir / "config.yaml").read_text())["optim"]["lr"]
    assert found and lr == pytest.approx(float(found.group(1)), rel=1e-3)
    assert 1e-5 < lr < 1.0 and result.test["miou"] > 0
