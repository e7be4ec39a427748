"""The speedrun recipe: whitening, identity init, lookahead, TTA, optimizer rules, the preset, and
a short real run on digits (plus a slow one on a CIFAR-10 subset when the JPEGs are at hand)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import cnnkit
from cnnkit.config import Config, OptimConfig, TrainConfig
from cnnkit.config import resolve as resolve_config
from cnnkit.engine.callbacks import Lookahead, weight_averager
from cnnkit.engine.checkpoint import load_checkpoint
from cnnkit.engine.optim import create_optimizer, create_scheduler
from cnnkit.errors import CnnkitError
from cnnkit.evaluation.tta import TestTimeAugment, translate
from cnnkit.models.speedrun import ConvGroup, Whitening
from cnnkit.recipes import SPEEDRUN_LR_PER_IMAGE, SPEEDRUN_WD_PER_IMAGE

CIFAR = Path("/tmp/cifar10-lead")


def correlated_images(n: int = 64, chans: int = 3, side: int = 16) -> torch.Tensor:
    """Images whose neighbouring pixels and channels are strongly correlated, like photos."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, 1, side, side, generator=g)
    smooth = nn.functional.avg_pool2d(base, 3, stride=1, padding=1) * 3
    mix = torch.randn(n, chans, side, side, generator=g) * 0.3
    return smooth.expand(-1, chans, -1, -1) + mix + 0.5  # (N, C, H, W), non-zero mean


def test_whitening_layer_whitens_patches():
    images = correlated_images()
    layer = Whitening(3, kernel_size=2)
    layer.fit(images)
    out = layer(images)  # (N, 24, 15, 15)
    assert out.shape == (64, 24, 15, 15)
    first = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()  # one row per patch
    cov = torch.cov(first.T, correction=0)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=0.02), cov.diag()
    assert first.mean(0).abs().max() < 1e-4  # the bias centres the outputs
    assert torch.allclose(out[:, 12:], -out[:, :12], atol=1e-5)  # the +/- pairs
    # the raw patches were far from white: that is what the layer undid
    raw = torch.cov(layer.patches(images).T.double())
    assert (raw - torch.eye(12, dtype=torch.float64)).abs().max() > 0.5


def test_init_from_data_takes_uint8_and_keeps_loaded_filters():
    model = cnnkit.create_model("test_speedrun_net", num_classes=10)
    assert not model.whiten.is_set
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    model.init_from_data(images)
    assert model.whiten.is_set
    before = model.whiten.weight.clone()
    model.init_from_data(torch.randn(32, 3, 32, 32))  # already set: kept (a loaded model)
    assert torch.equal(model.whiten.weight, before)
    model.init_from_data(torch.randn(32, 3, 32, 32), force=True)
    assert not torch.equal(model.whiten.weight, before)
    assert model.whiten.weight.requires_grad is False  # a buffer: no optimizer touches it
    with pytest.raises(CnnkitError, match="init_from_data needs images"):
        model.init_from_data(torch.zeros(4, 1, 32, 32))


def test_convs_start_as_identity():
    group = ConvGroup(6, 10, bn_momentum=0.4)
    x = torch.randn(2, 6, 9, 9)
    assert torch.allclose(group.conv1(x)[:, :6], x, atol=1e-6)
    y = torch.randn(2, 10, 5, 5)
    assert torch.allclose(group.conv2(y), y, atol=1e-6)
    # batch norm keeps its scale at 1: only the shift is a parameter
    assert group.bn1.weight is None and group.bn1.bias.requires_grad


def test_speedrun_net_contract_and_shapes():
    model = cnnkit.create_model("speedrun_net", num_classes=10)
    assert model.default_cfg["input_size"] == (3, 32, 32)
    features = model.forward_features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 256, 3, 3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    model.reset_classifier(4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert model.get_classifier().fc.bias is None
    layer = dict(model.named_modules())[model.default_cfg["feature_layer"]]
    assert isinstance(layer, ConvGroup)


def test_lookahead_matches_hand_computation():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    look = Lookahead(model, every=2, total_steps=4)
    slow, fast_values = 1.0, [2.0, 3.0, 5.0, 7.0]
    for step, value in enumerate(fast_values, start=1):
        with torch.no_grad():
            model.weight.fill_(value)  # what an optimizer step would have left
        look.update(model)
        if step % 2 == 0:
            d = 0.95**2 * (step / 4) ** 3
            slow = d * slow + (1 - d) * value
            assert model.weight.item() == pytest.approx(slow), step  # fast reset to slow
        else:
            assert model.weight.item() == value
    assert model.weight.item() == pytest.approx(slow)  # ends on the slow weights
    state = look.state_dict()
    again = Lookahead(model, every=2, total_steps=4)
    again.load_state_dict(state)
    assert again.updates == 4 and again.slow["weight"].item() == pytest.approx(slow)


def test_lookahead_and_ema_do_not_combine():
    with pytest.raises(CnnkitError, match="pick one"):
        weight_averager(nn.Linear(1, 1), TrainConfig(ema=True, lookahead=True), 10)


def test_tta_is_the_weighted_mean_of_explicit_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
    x = torch.randn(2, 3, 8, 8)
    model(x)
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., 2:10, 2:10], padded[..., 0:8, 0:8]
    assert torch.equal(translate(x, -1, -1), up_left)
    assert torch.equal(translate(x, 1, 1), down_right)

    def mirror_mean(v):
        return (model(v) + model(v.flip(-1))) / 2

    expected = 0.5 * mirror_mean(x) + 0.25 * mirror_mean(up_left) + 0.25 * mirror_mean(down_right)
    with torch.no_grad():
        assert torch.allclose(TestTimeAugment(model, "flip_translate")(x), expected, atol=1e-6)
        assert torch.allclose(TestTimeAugment(model, "flip")(x), mirror_mean(x), atol=1e-6)


def test_norm_bias_lr_and_decoupled_weight_decay():
    model = cnnkit.create_model("test_speedrun_net", num_classes=10)
    cfg = OptimConfig(
        lr=0.5, weight_decay=0.002, decoupled_wd=True, norm_bias_lr_mult=64.0, momentum=0.85
    )
    opt = create_optimizer(model, cfg, batch_size=256)
    decay, no_decay, raised = opt.param_groups
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in raised["params"]} == bn_biases
    assert raised["lr"] == 32.0 and decay["lr"] == no_decay["lr"] == 0.5
    assert decay["weight_decay"] == pytest.approx(0.002 / 0.5)  # shrink per step 0.002 at peak
    assert opt.defaults["nesterov"]
    with pytest.raises(CnnkitError, match="decoupled_wd is for sgd"):
        create_optimizer(model, OptimConfig(name="adamw", decoupled_wd=True), 256)


def test_triangle_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = create_scheduler(opt, OptimConfig(scheduler="triangle"), epochs=10, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.2) and lrs[23] == pytest.approx(1.0)
    assert lrs[100] == pytest.approx(0.07) and max(lrs) == pytest.approx(1.0)


def test_recipe_preset_sits_under_user_settings(tmp_path):
    cfg = resolve_config("digits", recipe="speedrun")
    assert (cfg.model.name, cfg.data.batch_size, cfg.train.epochs) == ("speedrun_net", 1024, 10)
    assert cfg.optim.lr == pytest.approx(1.5, abs=0.01)
    assert (cfg.train.lookahead, cfg.train.tta, cfg.train.label_smoothing) == (
        True,
        "flip_translate",
        0.2,
    )
    # a user batch size scales the preset's lr and decay; user keys win everywhere
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  label_smoothing: 0.0\n")
    cfg = resolve_config(
        "digits",
        config=yaml_file,
        recipe="speedrun",
        batch_size=256,
        epochs=3,
        overrides=["train.tta=none"],
    )
    assert cfg.optim.lr == pytest.approx(SPEEDRUN_LR_PER_IMAGE * 256)
    assert cfg.optim.weight_decay == pytest.approx(SPEEDRUN_WD_PER_IMAGE * 256)
    assert (cfg.train.epochs, cfg.train.tta, cfg.train.label_smoothing) == (3, "none", 0.0)
    # the recipe can come from a config object too; its other keys are kept
    cfg = resolve_config("digits", config=Config(train=TrainConfig(recipe="speedrun", seed=4)))
    assert (cfg.model.name, cfg.train.seed) == ("speedrun_net", 4)
    assert resolve_config("digits").model.name == "auto"  # default recipe: unchanged


def test_recipe_errors(tmp_path):
    with pytest.raises(CnnkitError, match="'train.recipe' is 'fast', not one of default, speedrun"):
        resolve_config("digits", recipe="fast")
    with pytest.raises(CnnkitError, match="'train.tta' is 'x'"):
        resolve_config("digits", overrides=["train.tta=x"])
    with pytest.raises(CnnkitError, match="speedrun recipe trains at 32x32"):
        cnnkit.train("digits", recipe="speedrun", input_size=16, out_dir=str(tmp_path))


def _digits_speedrun(tmp_path, overrides=(), **options):
    return cnnkit.train(
        "digits",
        recipe="speedrun",
        model="test_speedrun_net",
        batch_size=64,
        out_dir=str(tmp_path),
        progress="plain",
        num_workers=0,
        overrides=["data.hflip=0", *overrides],  # digits must not be mirrored
        **options,
    )


def test_speedrun_recipe_learns_digits(tmp_path, capsys):
    result = _digits_speedrun(tmp_path, ["model.kwargs={widths: [16, 32, 32]}"], epochs=5)
    assert "8x8 are resized to 32x32" in capsys.readouterr().out
    assert result.test["acc"] >= 0.8, result.test  # 0.84-0.94 over seeds 0-2; chance is 0.1
    assert result.test["tta"] == "flip_translate"
    assert result.fit.timings["init_from_data"] > 0
    assert len(result.fit.history) == 5
    # the report shows the final score's TTA predictions (reused, not a second plain pass)
    html = " ".join((result.run_dir / "report.html").read_text().split())
    assert "scored with test-time augmentation (flip_translate)" in html
    assert f"{result.test['acc']:.4f}" in html


def test_speedrun_resume_is_exact_and_keeps_whitening(tmp_path):
    fast = ["train.tta=none"]
    whole = _digits_speedrun(tmp_path, fast, epochs=2, name="whole")
    part = _digits_speedrun(tmp_path, fast, epochs=2, name="part", stop_after=1)
    resumed = cnnkit.train(resume=part.run_dir)
    assert "init_from_data" not in resumed.fit.timings  # the checkpoint held the filters
    a = load_checkpoint(whole.run_dir / "checkpoints/last.pt")
    b = load_checkpoint(resumed.run_dir / "checkpoints/last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["ema"]["updates"] == b["ema"]["updates"]  # the lookahead's state went along


@pytest.mark.slow
@pytest.mark.skipif(not (CIFAR / "train").is_dir(), reason="CIFAR-10 JPEGs not extracted")
def test_speedrun_on_cifar_subset(tmp_path):
    """2000 training images, 500 test: well above chance in a couple of minutes on one core."""
    for split, count in (("train", 200), ("test", 50)):
        for cls in sorted(os.listdir(CIFAR / split)):
            dest = tmp_path / "cifar" / split / cls
            dest.mkdir(parents=True)
            for name in sorted(os.listdir(CIFAR / split / cls))[:count]:
                shutil.copy(CIFAR / split / cls / name, dest / name)
    result = cnnkit.train(
        str(tmp_path / "cifar"),
        recipe="speedrun",
        batch_size=256,
        epochs=8,
        out_dir=str(tmp_path / "runs"),
        progress="plain",
        overrides=["model.kwargs={widths: [32, 64, 64]}"],
    )
    assert result.test["acc"] >= 0.45, result.test


def test_cli_recipe_flag(tmp_path, capsys):
    from cnnkit.cli.main import run

    assert run(["train", "--help"]) == 0
    assert "--recipe" in capsys.readouterr().out
    code = run(["train", "digits", "--recipe", "fast", f"train.out_dir={tmp_path}/r"])
    err = capsys.readouterr().err
    assert code != 0 and "'train.recipe' is 'fast'" in err and len(err.strip().splitlines()) == 1
