"""Semantic segmentation: data (pairs, mask kinds, checks), joint augmentation, the task's loss
and metrics, the U-Net, and training through ``cnnkit.train`` to a real mIoU with exact resume.

The data are shapes made on the fly: discs, squares and triangles (classes 1-3) on textured
noise, written as PNG image and mask folders."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

import cnnkit
from cnnkit import create_model, list_models
from cnnkit.config import DataConfig
from cnnkit.data import masks
from cnnkit.data.augment import Augment
from cnnkit.data.batchaug import BatchAugment, _resized_crop
from cnnkit.data.masks import voc_palette
from cnnkit.deploy.predictor import Predictor
from cnnkit.errors import CnnkitError
from cnnkit.modelfile import MODEL_FILE, load_model_file
from cnnkit.models import auto
from cnnkit.tasks.segmentation import IGNORE, Segmentation, SegmentationLoss, scores
from conftest import assert_same_checkpoints

SHAPES = ["background", "disc", "square", "triangle"]


def shape_pair(rng: np.random.Generator, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (side, side), mask uint8 (side, side)): 2-3 shapes, brighter than their
    striped, noisy background; the class is the shape, not the brightness."""
    yy, xx = np.mgrid[0:side, 0:side]
    stripes = 30 * np.sin(rng.uniform(0.1, 0.4) * xx + rng.uniform(0, 6))
    texture = 60 + stripes + rng.normal(0, 20, (side, side))
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 4)):
        cls = int(rng.integers(1, 4))
        r = int(rng.integers(side // 10, side // 5))
        cy, cx = (int(v) for v in rng.integers(r, side - r, 2))
        if cls == 1:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=cls)
        elif cls == 2:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=cls)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=cls)
    mask = np.asarray(canvas)
    image = np.where(mask > 0, texture + 90, texture) + rng.normal(0, 10, (side, side))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_shapes(root, count: int, side: int, seed: int = 0, dirs=("images", "masks")):
    rng = np.random.default_rng(seed)
    for name in dirs:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, mask = shape_pair(rng, side)
        Image.fromarray(image).save(root / dirs[0] / f"s{i:03d}.png")
        Image.fromarray(mask).save(root / dirs[1] / f"s{i:03d}.png")
    (root / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    return root


# --------------------------------------------------------------------------------------------
# Training: the acceptance figure and exact resume

FAST = [
    "train.progress=plain",
    "runtime.precision=fp32",
    "optim.name=adamw",
    "train.label_smoothing=0",
    "data.random_resized_crop=false",
    "data.pad_crop=4",
    "data.val_fraction=0.2",
]


def test_shapes_reach_090_miou_with_no_flags(shapes_result):
    # the 64x64 shapes, trained as `cnnkit train DIR` would (conftest.shapes_result: the task's
    # defaults, the U-Net, AdamW at 3e-3, batch 4, 10 epochs), in fp32: 0.94 mIoU in ~20 s on
    # 2 cores
    result = shapes_result
    best = result.fit.history[result.fit.best_epoch - 1]
    assert best["val_miou"] >= 0.9, best
    assert result.test_split == "val" and result.test["miou"] == pytest.approx(best["val_miou"])
    assert [r["class"] for r in result.test["per_class"]] == SHAPES
    with open(result.run_dir / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert header[:8] == [
        "epoch", "train_loss", "train_miou", "train_pixel_acc",
        "val_loss", "val_miou", "val_dice", "val_pixel_acc",
    ]  # fmt: skip
    assert "val_iou_triangle" in header
    _, meta = load_model_file(result.run_dir / MODEL_FILE)
    assert meta["task"] == "segmentation" and meta["classes"] == SHAPES
    model = cnnkit.load_model(result.run_dir)
    image = torch.zeros(1, 1, 64, 64)
    assert model(image).shape == (1, 4, 64, 64)
    saved = json.loads((result.run_dir / "val_metrics.json").read_text())
    assert saved["miou"] == pytest.approx(result.test["miou"])


def test_resume_is_exact(tmp_path):
    data = make_shapes(tmp_path / "shapes", 24, side=24, seed=3)
    options = dict(
        model="test_unet", epochs=3, batch_size=8, lr=0.01, out_dir=str(tmp_path),
        overrides=[*FAST, "data.pad_crop=2", "data.hflip=0.5", "data.cutout=4"],
    )  # fmt: skip
    whole = cnnkit.train(str(data), name="whole", **options)
    part = cnnkit.train(str(data), name="part", stop_after=1, **options)
    resumed = cnnkit.train(resume=part.run_dir)
    assert_same_checkpoints(whole.run_dir, resumed.run_dir, epoch=3)


def test_zero_flag_defaults_are_the_tasks_and_recorded(tmp_path, capsys):
    """A folder of image/mask pairs with no flags: model auto takes the U-Net at the images' own
    size (their side is under the CPU's 256 px), and the keys left at their classification
    defaults take the task's (small batches, AdamW, no label smoothing, no random resized crop,
    epochs for ~300 steps); what the user set stays, and config.yaml records the result."""
    data = make_shapes(tmp_path / "shapes", 10, side=40)
    result = cnnkit.train(
        str(data), epochs=1, out_dir=str(tmp_path), progress="plain", report=False,
        overrides=["runtime.precision=fp32", "train.label_smoothing=0.05"],
    )  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith("segmentation defaults where not set: data.batch_size=4") for line in lines
    )
    assert any(line.startswith("model auto: unet_small, from scratch") for line in lines)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["model"]["name"] == "unet_small" and saved["data"]["input_size"] is None
    assert (saved["data"]["batch_size"], saved["optim"]["name"]) == (4, "adamw")
    assert saved["data"]["random_resized_crop"] is False
    assert (saved["train"]["epochs"], saved["train"]["label_smoothing"]) == (1, 0.05)  # given
    assert saved["train"]["task"] == "segmentation" and saved["model"]["auto_choice"]
    assert cnnkit.load_model(result.run_dir)(torch.zeros(1, 1, 40, 40)).shape == (1, 4, 40, 40)


def test_a_given_input_size_is_the_one_the_auto_line_names(tmp_path, capsys):
    from cnnkit import prepare
    from cnnkit.config import load

    data = make_shapes(tmp_path / "shapes", 4, side=40)
    cfg = load(overrides=[f"data.source={data}", "data.input_size=48"])
    prepare.resolve_task(cfg)
    prepare.resolve_auto_model(cfg, "cpu")
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("model auto: unet_small at 48 px") and "--input-size 48 as given" in line
    assert cfg.data.input_size == 48 and cfg.model.auto_choice == line


def test_default_epochs_aim_at_a_step_count():
    epochs = {n: dict((k, v) for _, k, v in auto.segmentation_settings(n))["epochs"]
              for n in (8, 22, 120, 100_000)}  # fmt: skip
    low, high = auto.SEGMENTATION_EPOCHS
    assert epochs[8] == min(high, auto.SEGMENTATION_STEPS // 2)  # 2 steps an epoch
    assert low < epochs[22] < high and epochs[100_000] == low
    assert 0.9 <= epochs[120] * 30 / auto.SEGMENTATION_STEPS <= 1.1  # 30 steps an epoch
    assert auto.choose_segmentation(512, 30, "cpu").input_size == 256
    assert auto.choose_segmentation(100, 30, "cpu").input_size is None  # the images' own
    assert auto.choose_segmentation(1024, 30, "cuda").input_size == 512


def test_task_is_auto_detected_and_classifiers_refused(tmp_path):
    data = make_shapes(tmp_path / "shapes", 6, side=16)
    with pytest.raises(CnnkitError, match="simple_cnn|resnet20.*classifier"):
        cnnkit.train(str(data), model="resnet20", epochs=1, out_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------
# Data: layouts, mask kinds, checks


def test_layout_split_folders_and_image_label_names(tmp_path):
    root = tmp_path / "d"
    make_shapes(root / "train", 8, 16, dirs=("image", "label"))
    make_shapes(root / "val", 4, 16, seed=1, dirs=("image", "label"))
    (root / "classes.txt").write_text("\n".join(SHAPES))
    splits = masks.build(DataConfig(source=str(root)), seed=0)
    assert len(splits.train) == 8 and len(splits.val) == 4 and splits.test is None
    assert splits.classes == SHAPES and splits.in_chans == 1
    image, mask = splits.train[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert mask.shape == (16, 16) and mask.dtype == torch.long


def test_carved_val_is_seeded(tmp_path):
    data = make_shapes(tmp_path / "d", 20, 16)
    cfg = DataConfig(source=str(data), val_fraction=0.25)
    a, b = masks.build(cfg, seed=1), masks.build(cfg, seed=1)
    c = masks.build(cfg, seed=2)
    assert len(a.val) == 5 and a.val.paths == b.val.paths != c.val.paths


def _pair(root, stem, image, mask, image_dir="images", mask_dir="masks"):
    for name in (image_dir, mask_dir):
        (root / name).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / image_dir / f"{stem}.png")
    mask.save(root / mask_dir / f"{stem}.png") if isinstance(mask, Image.Image) else (
        Image.fromarray(mask).save(root / mask_dir / f"{stem}.png")
    )


def test_binary_masks_become_two_classes_without_ignore(tmp_path):
    image = np.full((8, 8), 100, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    for i in range(3):
        _pair(tmp_path, f"m{i}", image, mask)
    splits = masks.build(DataConfig(source=str(tmp_path), val_fraction=0), seed=0)
    assert splits.classes == ["background", "foreground"]
    assert set(splits.train.masks.unique().tolist()) == {0, 1}
    assert int(splits.train.masks[0].sum()) == 9


def test_palette_masks_keep_indices_and_the_ignore_value(tmp_path):
    image = np.full((8, 8, 3), 50, np.uint8)
    indices = np.zeros((8, 8), np.uint8)
    indices[:, 4:] = 2
    indices[0, :] = 255  # VOC's border: ignored
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
    for i in range(2):
        _pair(tmp_path, f"p{i}", image, palette)
    splits = masks.build(DataConfig(source=str(tmp_path), val_fraction=0), seed=0)
    assert splits.classes == ["class_0", "class_1", "class_2"] and splits.in_chans == 3
    got = splits.train.masks[0]
    assert int(got[0, 0]) == IGNORE and int(got[3, 6]) == 2 and int(got[3, 1]) == 0


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("missing", "no mask for image .*b1.png"),
        ("size", r"mask .*b1.png is 6x8 but its image .*b1.png is 8x8"),
        ("values", r"mask .*b1.png has values \[7\] outside the 4 classes"),
    ],
)
def test_bad_pairs_name_the_file(tmp_path, broken, message):
    root = make_shapes(tmp_path / "d", 1, 8)
    image = np.zeros((8, 8), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    if broken == "size":
        mask = np.zeros((8, 6), np.uint8)
    if broken == "values":
        mask[0, 0] = 7
    _pair(root, "b1", image, mask)
    if broken == "missing":
        (root / "masks" / "b1.png").unlink()
    with pytest.raises(CnnkitError, match=message):
        masks.build(DataConfig(source=str(root)), seed=0)


def test_colour_mask_is_refused(tmp_path):
    root = make_shapes(tmp_path / "d", 1, 8)
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(root / "masks" / "s000.png")
    with pytest.raises(CnnkitError, match="s000.png is a colour image"):
        masks.build(DataConfig(source=str(root)), seed=0)


def test_unbatched_augmentations_are_refused(tmp_path):
    root = make_shapes(tmp_path / "d", 2, 8)
    with pytest.raises(CnnkitError, match="auto_augment"):
        masks.build(DataConfig(source=str(root), auto_augment="trivial"), seed=0)


# --------------------------------------------------------------------------------------------
# Joint augmentation: the mask moves with its image


@pytest.mark.parametrize(
    "aug",
    [
        Augment(pad_crop=3, hflip=0.5),
        Augment(pad_crop=3, pad_mode="reflect", hflip=0.5),
        Augment(random_resized_crop=True, rrc_scale=(0.25, 1.0), hflip=0.5),
    ],
)
def test_masks_follow_their_images(aug):
    """Images whose pixel value encodes the mask (class x 60): after the batched augmentation,
    every pixel's class read back from the image equals the mask's, except where resampling
    blends two classes (bilinear at boundaries) or padding left no class (IGNORE)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(8, 24, 24, dtype=torch.uint8)
    for i in range(8):
        y, x = torch.randint(0, 14, (2,), generator=g).tolist()
        mask[i, y : y + 10, x : x + 10] = 1 + i % 3
    images = (mask * 60)[:, None]  # uint8 (B, 1, H, W)
    batch = BatchAugment(aug, [0.0], [1.0], (24, 24), seed=1)
    params = batch.draw(images.shape, torch.arange(8), epoch=2, step=3, device="cpu")
    out = batch.apply(images, params)[:, 0] * 255  # back to 0..255
    got = batch.apply_masks(mask, params, fill=IGNORE)
    assert got.shape == (8, 24, 24) and got.dtype == torch.long
    assert params["flip"].any()  # the draw flipped some, not all: flips must be joint
    valid = got != IGNORE
    from_image = (out / 60).round().long()
    agree = (from_image == got)[valid].float().mean()
    if aug.random_resized_crop:  # bilinear blends a band of pixels at each boundary...
        assert agree > 0.95
        # ... nearest on the image's own grid gives the mask exactly
        nearest = _resized_crop(images, params["box"], (24, 24), mode="nearest")
        flipped = torch.where(params["flip"].view(-1, 1, 1, 1), nearest.flip(3), nearest)
        assert torch.equal((flipped[:, 0] / 60).round().long(), got)
    else:
        assert agree == 1.0 and (aug.pad_mode == "reflect") == bool(valid.all())


# --------------------------------------------------------------------------------------------
# Loss and metrics


def test_metrics_match_a_hand_count_and_skip_ignored_pixels():
    task = Segmentation()
    metrics = task.metrics(3, torch.device("cpu"), train=False)
    targets = torch.tensor([[[0, 0, 1, 1], [2, 2, IGNORE, IGNORE]]])  # (1, 2, 4)
    predicted = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 2]]])
    logits = torch.nn.functional.one_hot(predicted, 3).permute(0, 3, 1, 2).float()
    metrics.update(torch.tensor(0.5), logits, targets)
    out = metrics.summary(metrics.sums())
    # class 0: tp 1, union 3; class 1: tp 2, union 3; class 2: tp 1, union 2
    assert out["iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert out["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert out["pixel_acc"] == pytest.approx(4 / 6)
    assert out["confusion"].sum() == 6 and out["images"] == 1
    absent = scores(torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 0, 0]]))
    assert np.isnan(absent["iou"][2]) and absent["miou"] == 1.0


def test_loss_ignores_ignored_pixels_and_weights_its_terms():
    logits = torch.randn(2, 3, 5, 5, requires_grad=True)
    masks_ = torch.randint(0, 3, (2, 5, 5))
    masks_[:, 0] = IGNORE
    logits.detach()[:, :, 0] = 100.0  # wild logits on ignored pixels change nothing
    both = SegmentationLoss()(logits, masks_)
    ce = SegmentationLoss(dice_weight=0.0)(logits, masks_)
    dice = SegmentationLoss(ce_weight=0.0)(logits, masks_)
    assert both.item() == pytest.approx((ce + dice).item(), rel=1e-6)
    plain = torch.nn.functional.cross_entropy(logits[:, :, 1:], masks_[:, 1:])
    assert ce.item() == pytest.approx(plain.item(), rel=1e-6)
    both.backward()
    assert logits.grad[:, :, 0].abs().max() == 0


# --------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("up", ["transpose", "bilinear"])
@pytest.mark.parametrize("size", [(32, 32), (37, 50)])
def test_unet_outputs_at_input_resolution(up, size):
    model = create_model("test_unet", num_classes=5, in_chans=1, up=up)
    x = torch.randn(2, 1, *size)
    out = model(x)
    assert out.shape == (2, 5, *size)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape[1] == 8
    model.reset_classifier(2)
    assert model(x).shape == (2, 2, *size) and model.get_classifier() is model.head


def test_segmentation_models_are_listed_apart():
    assert {"unet", "unet_small"} <= set(list_models(task="segmentation"))
    assert "unet" not in list_models(task="classification") and "unet" in list_models()


# --------------------------------------------------------------------------------------------
# Predict


def test_predict_writes_palette_masks_and_class_fractions(tmp_path):
    data = make_shapes(tmp_path / "shapes", 8, side=16)
    result = cnnkit.train(
        str(data), model="test_unet", epochs=1, batch_size=4, out_dir=str(tmp_path),
        overrides=FAST,
    )  # fmt: skip
    big = tmp_path / "big.png"
    Image.fromarray(np.full((20, 30), 90, np.uint8)).save(big)  # another size than trained
    out = cnnkit.predict(result.run_dir, [str(big)], mask_dir=tmp_path / "masks")
    assert out[0]["size"] == [30, 20] and set(out[0]["fractions"]) == set(SHAPES)
    assert sum(out[0]["fractions"].values()) == pytest.approx(1.0)
    with Image.open(out[0]["mask"]) as mask:
        assert mask.mode == "P" and mask.size == (30, 20)
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 1, 2, 3}
        classes = np.asarray(mask)
    with Image.open(out[0]["overlay"]) as overlay:  # the grey image under the class colours
        assert overlay.mode == "RGB" and overlay.size == (30, 20)
        pixels = np.asarray(overlay).astype(int)
        colours = np.asarray(voc_palette(), dtype=float).reshape(256, 3)[classes]
        assert np.abs(pixels - (0.5 * 90 + 0.5 * colours)).max() <= 1


def test_full_size_masks_are_resized_probabilities_then_argmax():
    """Masks at an image's own size: class probabilities resized bilinearly, then the most
    probable class per pixel, class plane by class plane; at the input size, the argmax."""
    probs = torch.rand(3, 6, 5).softmax(0)
    whole = torch.nn.functional.interpolate(probs[None], size=(13, 11), mode="bilinear")[0]
    assert torch.equal(Predictor.full_mask(probs, (11, 13)), whole.argmax(0).to(torch.uint8))
    assert torch.equal(Predictor.full_mask(probs, (5, 6)), probs.argmax(0).to(torch.uint8))
    edge = torch.zeros(2, 4, 4)
    edge[0, :, :2], edge[1, :, 2:] = 1.0, 1.0  # class 0 left, class 1 right
    mask = Predictor.full_mask(edge, (8, 8))
    assert (mask[:, :4] == 0).all() and (mask[:, 4:] == 1).all()  # the edge stays in the middle


def test_final_score_uses_the_runs_loss_weights(tmp_path):
    """The score written after training (val here: no test split) is the same pass as the last
    epoch's validation, with the run's CE/Dice weights, so its loss equals that row's."""
    data = make_shapes(tmp_path / "shapes", 24, side=24, seed=5)
    result = cnnkit.train(
        str(data), model="test_unet", epochs=1, batch_size=8, out_dir=str(tmp_path),
        overrides=[*FAST, "train.dice_weight=0.25"],
    )  # fmt: skip
    assert result.test_split == "val"
    assert result.test["loss"] == pytest.approx(result.fit.history[-1]["val_loss"], rel=1e-6)
