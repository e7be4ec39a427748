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
