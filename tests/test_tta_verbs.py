"""--tta for `cnnkit eval` (reported against no TTA) and `cnnkit predict`; `cnnkit eval
--input-size` (the FixRes check: score at another side than the trained one)."""

from __future__ import annotations

import json

import pytest
import torch

from cnnkit.cli.main import run
from cnnkit.deploy.predictor import predict
from cnnkit.evaluation.scoring import evaluate


def test_eval_with_tta_reports_the_score_without_it(digits_result, capsys):
    plain = evaluate(digits_result.run_dir)
    flipped = evaluate(digits_result.run_dir, tta="flip")
    assert flipped["tta"] == "flip" and flipped["acc_no_tta"] == plain["acc"]
    assert run(["eval", str(digits_result.run_dir), "--tta", "flip"]) == 0
    assert f"with tta flip; without: acc {plain['acc']:.4f}" in capsys.readouterr().out


def test_predict_with_tta_averages_views(digits_model, digit_pngs, capsys):
    paths = [str(p) for p, _ in digit_pngs[:4]]
    plain = predict(digits_model, paths, top_k=10)
    views = predict(digits_model, paths, top_k=10, tta="flip_translate")
    assert [r["input"] for r in views] == paths
    probs = [{t["class"]: t["prob"] for t in r["top"]} for r in views]
    assert all(abs(sum(p.values()) - 1) < 1e-3 for p in probs)
    assert probs != [{t["class"]: t["prob"] for t in r["top"]} for r in plain]
    assert run(["predict", str(digits_model), paths[0], "--tta", "flip", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["input"] == paths[0]


def test_unknown_tta_is_one_line(digits_model, capsys):
    assert run(["predict", str(digits_model), "x.png", "--tta", "flips"]) == 2
    err = capsys.readouterr().err
    assert "flip_translate" in err and len(err.strip().splitlines()) == 1, err


def test_eval_at_another_input_size_feeds_images_of_that_size(digits_result, capsys):
    seen = []  # (H, W) of each batch the classifier (a module with a default_cfg) is given
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: (
            seen.append(tuple(args[0].shape[-2:])) if hasattr(module, "default_cfg") else None
        )
    )
    try:
        plain = evaluate(digits_result.run_dir)
        same = evaluate(digits_result.run_dir, input_size=8)  # digits train at their own 8 px
        seen.clear()
        larger = evaluate(digits_result.run_dir, input_size=16)
    finally:
        hook.remove()
    assert set(seen) == {(16, 16)} and (larger["input_size"], larger["trained_size"]) == (
        16,
        [8, 8],
    )
    assert (same["acc"], same["loss"]) == (plain["acc"], plain["loss"])
    assert larger["loss"] != pytest.approx(plain["loss"])
    assert run(["eval", str(digits_result.run_dir), "--input-size", "16"]) == 0
    assert "evaluated at 16 px; the model trained at 8x8" in capsys.readouterr().out


def test_dense_outputs_are_mapped_back_before_averaging():
    """Segmentation logits (B, K, H, W): a mirrored view's map is mirrored back and a shifted
    view's shifted back, so a per-pixel model (1x1 conv) gives its own map under every mode
    (inside the 1-pixel border that the shifts fill by reflection); a model that is not
    mirror-symmetric averages its map with the mirrored-back map of the mirror image."""
    from cnnkit.evaluation.tta import TestTimeAugment

    torch.manual_seed(0)
    x = torch.randn(3, 2, 9, 7)
    pointwise = torch.nn.Conv2d(2, 4, 1).eval()
    with torch.no_grad():
        plain = pointwise(x)
        assert torch.allclose(TestTimeAugment(pointwise, "flip")(x), plain, atol=1e-6)
        views = TestTimeAugment(pointwise, "flip_translate")(x)
        assert torch.allclose(views[..., 1:-1, 1:-1], plain[..., 1:-1, 1:-1], atol=1e-6)
        lopsided = torch.nn.Conv2d(2, 4, (1, 3), padding=(0, 1)).eval()
        expected = 0.5 * (lopsided(x) + lopsided(x.flip(-1)).flip(-1))
        assert torch.allclose(TestTimeAugment(lopsided, "flip")(x), expected, atol=1e-6)
        assert not torch.allclose(expected, lopsided(x), atol=1e-3)


def test_segmentation_eval_and_predict_take_tta(shapes_result, capsys):
    run_dir = shapes_result.run_dir
    plain = evaluate(run_dir)
    flipped = evaluate(run_dir, tta="flip")
    assert flipped["miou_no_tta"] == plain["miou"] and 0.8 < flipped["miou"] <= 1
    assert flipped["pixel_acc_no_tta"] == plain["pixel_acc"]
    assert run(["eval", str(run_dir), "--tta", "flip"]) == 0
    assert f"without: mIoU {plain['miou']:.4f}" in capsys.readouterr().out
    image = str(next((run_dir.parent / "shapes" / "images").glob("*.png")))
    masks = predict(run_dir, [image], tta="flip_translate")
    assert masks[0]["size"] == [64, 64] and sum(masks[0]["fractions"].values()) == 1.0
