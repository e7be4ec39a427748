"""Decoder heads on backbones (``fpn:<backbone>``, ``deeplab:<backbone>``): logits at the input's
size from zoo, ``tv:`` and ``timm:`` backbones, training on the synthetic shapes, exact resume,
a classifier's weights filling the backbone, and clear errors."""

from __future__ import annotations

import sys

import pytest
import torch

import cnnkit
from cnnkit import create_model
from cnnkit.errors import CnnkitError
from cnnkit.models import load_state_into, model_task
from conftest import assert_same_checkpoints
from test_segmentation import FAST, make_shapes


@pytest.mark.parametrize(
    ("name", "strides"),
    [
        ("fpn:test_resnet_bottleneck", [4, 8]),
        ("deeplab:test_mobilenetv2", [4, 8]),
        ("fpn:tv:resnet18", [4, 8, 16, 32]),
        ("deeplab:tv:mobilenet_v3_small", [4, 8, 16, 32]),
        ("fpn:timm:mobilenetv3_small_050", [4, 8, 16, 32]),
        ("deeplab:timm:resnet10t", [4, 8, 16, 32]),
    ],
)
def test_heads_give_logits_at_input_size(name, strides):
    if "timm:" in name:
        pytest.importorskip("timm")
    model = create_model(name, num_classes=3, in_chans=1)
    assert model_task(name) == "segmentation" and model.backbone.strides == strides
    for size in [(72, 56), (37, 50)]:  # sides that are not multiples of 32, one odd
        x = torch.randn(2, 1, *size)
        assert model(x).shape == (2, 3, *size)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.default_cfg["architecture"] == name and len(model.default_cfg["mean"]) == 1
    model.reset_classifier(5)
    assert model(x).shape == (2, 5, *size)


@pytest.mark.parametrize("head", ["fpn", "deeplab"])
def test_heads_learn_the_shapes(tmp_path, head):
    # ~13 s each on 2 shared cores; the logits are made at stride 4, so 48 px shapes lose their
    # edges and 0.7 mIoU is where 8 epochs get (background alone scores ~0.22)
    data = make_shapes(tmp_path / "shapes", 160, side=48)
    result = cnnkit.train(
        str(data), model=f"{head}:resnet10_slim", epochs=8, batch_size=16, lr=0.01,
        out_dir=str(tmp_path), overrides=[*FAST, "model.kwargs={decoder_width: 32}"],
    )  # fmt: skip
    best = result.fit.history[result.fit.best_epoch - 1]
    assert best["val_miou"] >= 0.6, best
    loaded = cnnkit.load_model(result.run_dir)  # rebuilt from the file's name and kwargs
    x = torch.rand(2, 1, 40, 44)
    with torch.no_grad():
        logits = loaded(x)
        traced = torch.jit.trace(loaded, x)  # what export's torchscript writer does
        assert torch.allclose(traced(x), logits, atol=1e-5)
    assert logits.shape == (2, 4, 40, 44)


def test_head_resume_is_exact(tmp_path):
    data = make_shapes(tmp_path / "shapes", 24, side=24, seed=3)
    options = dict(
        model="fpn:test_resnet_bottleneck", epochs=3, batch_size=8, lr=0.01,
        out_dir=str(tmp_path), overrides=[*FAST, "data.pad_crop=2", "data.hflip=0.5"],
    )  # fmt: skip
    whole = cnnkit.train(str(data), name="whole", **options)
    part = cnnkit.train(str(data), name="part", stop_after=1, **options)
    resumed = cnnkit.train(resume=part.run_dir)
    assert_same_checkpoints(whole.run_dir, resumed.run_dir, epoch=3)


@pytest.mark.parametrize("backbone", ["test_resnet_bottleneck", "tv:resnet18"])
def test_classifier_weights_fill_the_backbone(backbone):
    """What ``--weights classifier.safetensors`` does: the body loads, its head is left out."""
    classifier = create_model(backbone, num_classes=7, in_chans=1)
    model = create_model(f"deeplab:{backbone}", num_classes=3, in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    skipped = load_state_into(model, classifier.state_dict())
    assert skipped and all(k.startswith("head.") for k in skipped)  # the decoder starts fresh
    mine = model.state_dict()
    for key, value in classifier.state_dict().items():
        if f"backbone.body.{key}" in mine:
            assert torch.equal(mine[f"backbone.body.{key}"], value), key
    assert all(torch.equal(mine[k], v) for k, v in before.items())  # the decoder is untouched
    assert sum(k.startswith("backbone.body.") for k in mine) > 10


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("fpn:resnet81", "unknown model 'resnet81'. Did you mean"),
        ("fpn:unet", "backbone of a head must be a classifier, not 'unet'"),
        ("fpn:speedrun_net", "cannot find the feature maps of 'speedrun_net': torch.fx"),
        ("deeplab:timm:resnet18", "timm:resnet18 needs the timm package: pip install timm"),
    ],
)
def test_bad_backbones_are_named(monkeypatch, name, message):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(CnnkitError, match=message):
        create_model(name, num_classes=2)


def test_segmentation_refuses_a_classifier_and_names_the_heads(tmp_path):
    data = make_shapes(tmp_path / "shapes", 4, side=16)
    with pytest.raises(CnnkitError, match="fpn:resnet20, deeplab:resnet20"):
        cnnkit.train(str(data), model="resnet20", epochs=1, out_dir=str(tmp_path))
