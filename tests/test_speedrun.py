"""The speedrun recipes: whitening, identity init, lookahead, TTA, optimizer rules (Muon, the
whitening bias's early-only group, the linear and triangle schedules), progressive resizing, the
presets, and short real runs on digits (plus a slow one on a CIFAR-10 subset when the JPEGs are
at hand)."""

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
from cnnkit.engine.fit import progressive_scales
from cnnkit.engine.loop import resize_batch, scaled_side
from cnnkit.engine.optim import Muon, create_optimizer, create_scheduler, orthogonalise
from cnnkit.errors import CnnkitError
from cnnkit.evaluation.tta import (
    FLIP_BELOW_MARGIN,
    TRANSLATE_BELOW_MARGIN,
    TestTimeAugment,
    translate,
)
from cnnkit.models.speedrun import ConvGroup, Whitening
from cnnkit.recipes import (
    MUON_BIAS_LR_PER_IMAGE,
    MUON_HEAD_LR_PER_IMAGE,
    SPEEDRUN_LR_PER_IMAGE,
    SPEEDRUN_WD_PER_IMAGE,
)

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


def test_tta_is_the_weighted_mean_of_explicit_views_where_unsure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
    # inputs of very different scales: some logits far apart (sure), some close (unsure)
    x = torch.randn(8, 3, 8, 8) * torch.tensor([0.02, 0.05, 0.1, 0.2, 1, 3, 10, 30]).view(
        -1, 1, 1, 1
    )
    model(x)
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., 2:10, 2:10], padded[..., 0:8, 0:8]
    assert torch.equal(translate(x, -1, -1), up_left)
    assert torch.equal(translate(x, 1, 1), down_right)

    def mirror_mean(v):
        return (model(v) + model(v.flip(-1))) / 2

    def margin(logits):
        top2 = logits.softmax(1).topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]

    with torch.no_grad():
        plain, flip = model(x), mirror_mean(x)
        full = 0.5 * flip + 0.25 * mirror_mean(up_left) + 0.25 * mirror_mean(down_right)
        mirrored = margin(plain) < FLIP_BELOW_MARGIN  # the plain view is unsure
        shifted = mirrored & (margin(flip) < TRANSLATE_BELOW_MARGIN)  # the flip mean too
        assert 0 < shifted.sum() < mirrored.sum() < len(x)  # all three kinds in the batch
        expected = torch.where(mirrored[:, None], flip, plain)
        expected = torch.where(shifted[:, None], full, expected)
        got = TestTimeAugment(model, "flip_translate")(x)
        assert torch.allclose(got, expected, atol=1e-6)
        expected_flip = torch.where(mirrored[:, None], flip, plain)
        assert torch.allclose(TestTimeAugment(model, "flip")(x), expected_flip, atol=1e-6)
        for i in range(len(x)):  # the choice is per image: alone it scores the same
            alone = TestTimeAugment(model, "flip_translate")(x[i : i + 1])
            assert torch.allclose(alone, got[i : i + 1], atol=1e-6)


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


def test_recipe_presets_sit_under_user_settings(tmp_path):
    cfg = resolve_config("digits", recipe="airbench94")
    assert (cfg.model.name, cfg.data.batch_size, cfg.train.epochs) == ("speedrun_net", 1024, 10)
    assert cfg.optim.lr == pytest.approx(1.5, abs=0.01)
    assert (cfg.train.lookahead, cfg.train.tta, cfg.train.label_smoothing) == (
        True,
        "flip_translate",
        0.2,
    )
    cfg = resolve_config("digits", recipe="speedrun")
    assert (cfg.model.name, cfg.data.batch_size, cfg.train.epochs) == ("speedrun_net", 2000, 8)
    o = cfg.optim
    assert (o.name, o.scheduler, o.muon_lr, o.muon_momentum, o.whiten_bias_epochs) == (
        "muon",
        "linear",
        0.24,
        0.6,
        3,
    )
    # airbench94_muon's bias lr 0.053 per image, its head lr converted to the 1/9 head scale
    assert o.lr * o.norm_bias_lr_mult == pytest.approx(0.053 * 2000)
    assert o.lr == pytest.approx(0.67 * 2000 / 256**2 * 81)
    assert (cfg.train.lookahead, cfg.train.progressive_min) == (False, 0.75)
    # a user batch size scales the preset's lr and decay; user keys win everywhere
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  label_smoothing: 0.0\n")
    for recipe, lr_per_image in (
        ("airbench94", SPEEDRUN_LR_PER_IMAGE),
        ("speedrun", MUON_HEAD_LR_PER_IMAGE),
    ):
        cfg = resolve_config(
            "digits",
            config=yaml_file,
            recipe=recipe,
            batch_size=256,
            epochs=3,
            overrides=["train.tta=none"],
        )
        assert cfg.optim.lr == pytest.approx(lr_per_image * 256)
        assert (cfg.train.epochs, cfg.train.tta, cfg.train.label_smoothing) == (3, "none", 0.0)
    assert cfg.optim.lr * cfg.optim.norm_bias_lr_mult == pytest.approx(MUON_BIAS_LR_PER_IMAGE * 256)
    cfg = resolve_config("digits", recipe="airbench94", batch_size=256)
    assert cfg.optim.weight_decay == pytest.approx(SPEEDRUN_WD_PER_IMAGE * 256)
    # the recipe can come from a config object too; its other keys are kept
    cfg = resolve_config("digits", config=Config(train=TrainConfig(recipe="speedrun", seed=4)))
    assert (cfg.model.name, cfg.train.seed) == ("speedrun_net", 4)
    assert resolve_config("digits").model.name == "auto"  # default recipe: unchanged


def test_orthogonalise_flattens_the_spectrum():
    g = torch.randn(64, 288, generator=torch.Generator().manual_seed(0))
    g = g * torch.logspace(-3, 0, 288)  # singular values spread over orders of magnitude
    for matrix in (g, g.T):  # wide and tall
        s = torch.linalg.svdvals(orthogonalise(matrix))
        assert s.min() > 0.5 and s.max() < 1.3, (s.min(), s.max())  # about U V^T
        # with g's own singular vectors: U^T O V is diagonal
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        inner = u.T @ orthogonalise(matrix) @ vh.T
        off = inner - torch.diag(torch.diagonal(inner))
        assert off.norm() < 0.02 * inner.norm()


def test_muon_steps_filters_and_sgd_for_the_rest():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(2)
    )
    model(torch.randn(2, 3, 6, 6))
    cfg = OptimConfig(name="muon", lr=0.1, momentum=0.85, weight_decay=0.01, muon_lr=0.2)
    opt = create_optimizer(model, cfg, batch_size=8)
    assert isinstance(opt, Muon)
    filters = [g for g in opt.param_groups if g["muon"]]
    assert len(filters) == 1 and filters[0]["params"] == [model[0].weight]
    assert (filters[0]["lr"], filters[0]["momentum"], filters[0]["weight_decay"]) == (0.2, 0.6, 0)
    # the other groups step exactly as torch's Nesterov SGD with the same groups
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    index = {id(p): i for i, p in enumerate(model.parameters())}
    ref = torch.optim.SGD(
        [
            {
                **{k: v for k, v in g.items() if k not in ("params", "muon")},
                "params": [twin[index[id(p)]] for p in g["params"]],
            }
            for g in opt.param_groups
            if not g["muon"]
        ],
        lr=0.1,
        momentum=0.85,
        nesterov=True,
    )
    x = torch.randn(4, 3, 6, 6)
    for _ in range(3):
        for params in (list(model.parameters()), twin):
            for p in params:
                p.grad = torch.ones_like(p) * 0.1 + p.detach() * 0.5
        opt.step()
        ref.step()
    for p in model.parameters():
        if p is model[0].weight:
            # Muon holds the filter norm at sqrt(out channels) before each step: one step of
            # lr 0.2 x an update of spectral norm ~1 stays close to it
            assert abs(p.norm().item() - 8**0.5) < 0.2 * 8**0.5
            assert not torch.equal(p, twin[index[id(p)]])
        else:
            torch.testing.assert_close(p, twin[index[id(p)]])
    del x


def test_whiten_bias_trains_only_early():
    model = cnnkit.create_model("test_speedrun_net", num_classes=10)
    model.init_from_data(torch.randn(32, 3, 32, 32))
    bias = model.whiten.bias
    cfg = OptimConfig(name="muon", lr=0.01, norm_bias_lr_mult=64.0, scheduler="linear")
    opt = create_optimizer(model, cfg, batch_size=8, early=([bias], 3))
    sched = create_scheduler(opt, cfg, epochs=2, steps_per_epoch=5)
    early = [g for g in opt.param_groups if "until_step" in g]
    assert len(early) == 1 and early[0]["params"] == [bias] and early[0]["lr"] == 0.64
    lrs, values = [], []
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(6):
        lrs.append((early[0]["lr"], opt.param_groups[0]["lr"]))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        values.append(bias.detach().clone())
    assert [round(a, 4) for a, _ in lrs] == [0.64, 0.4267, 0.2133, 0.0, 0.0, 0.0]
    assert [round(b, 4) for _, b in lrs] == [0.01, 0.009, 0.008, 0.007, 0.006, 0.005]  # linear
    assert not torch.equal(values[0], values[1])
    assert torch.equal(values[2], values[3]) and torch.equal(values[3], values[5])  # frozen
    with pytest.raises(CnnkitError, match="whiten_bias_epochs needs a per-step schedule"):
        create_scheduler(opt, OptimConfig(scheduler="plateau"), 2, 5)


def test_progressive_resizing_schedule_and_batches():
    tc = TrainConfig(epochs=8, progressive_min=0.75, progressive_epochs=0.75)
    assert [scaled_side(32, s) for s in progressive_scales(tc)] == [24, 24, 24, 28, 28, 28, 32, 32]
    assert progressive_scales(TrainConfig(epochs=3)) == [1.0, 1.0, 1.0]
    assert scaled_side(128, 0.75) == 96 and scaled_side(224, 0.6) == 128  # multiples of 8
    images = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, 3, (2, 32, 32))
    small, small_masks = resize_batch(images, masks, 0.5)
    assert small.shape == (2, 3, 16, 16) and small.is_contiguous(memory_format=torch.channels_last)
    assert small_masks.shape == (2, 16, 16) and set(small_masks.unique().tolist()) <= {0, 1, 2}
    # antialiased: noise shrunk 4x is averaged over the whole footprint, not 2x2 samples
    tiny = resize_batch(images, labels := torch.tensor([1, 2]), 0.25)[0]
    plain = nn.functional.interpolate(images, size=(8, 8), mode="bilinear")
    assert tiny.shape == (2, 3, 8, 8) and tiny.var() < 0.5 * plain.var()
    assert resize_batch(images, labels, 0.5)[1] is labels  # class labels untouched
    with pytest.raises(CnnkitError, match="train.progressive_min"):
        resolve_config("digits", overrides=["train.progressive_min=0.1"])


class ShapeRecorder(nn.Module):
    """A tiny CNN that notes the side of every batch it trains on."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 10),
        )
        self.sides: list[int] = []

    def forward(self, x):
        if self.training:
            self.sides.append(x.shape[-1])
        return self.net(x)


def test_progressive_resizing_trains_on_smaller_batches(tmp_path, capsys):
    model = ShapeRecorder()
    cnnkit.train(
        "digits",
        model=model,
        epochs=4,
        batch_size=512,
        input_size=32,
        out_dir=str(tmp_path),
        progress="plain",
        overrides=["train.progressive_min=0.5", "train.report=false"],
    )
    per_epoch = len(model.sides) // 4
    assert [model.sides[i * per_epoch] for i in range(4)] == [16, 24, 32, 32]
    assert "progressive resizing: train side by epoch 16,24,32,32" in capsys.readouterr().out


def test_recipe_errors(tmp_path):
    with pytest.raises(
        CnnkitError, match="'train.recipe' is 'fast', not one of default, speedrun, airb"
    ):
        resolve_config("digits", recipe="fast")
    with pytest.raises(CnnkitError, match="'train.tta' is 'x'"):
        resolve_config("digits", overrides=["train.tta=x"])
    with pytest.raises(CnnkitError, match="speedrun recipe trains at 32x32"):
        cnnkit.train("digits", recipe="speedrun", input_size=16, out_dir=str(tmp_path))


def _digits_speedrun(tmp_path, overrides=(), **options):
    options.setdefault("recipe", "speedrun")
    return cnnkit.train(
        "digits",
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


@pytest.mark.parametrize("recipe", ["speedrun", "airbench94"])
def test_speedrun_resume_is_exact_and_keeps_whitening(tmp_path, recipe):
    # speedrun: Muon, the whitening bias's early group and progressive resizing across the stop
    fast = ["train.tta=none"] + (["optim.whiten_bias_epochs=1.5"] if recipe == "speedrun" else [])
    whole = _digits_speedrun(tmp_path, fast, epochs=3, name="whole", recipe=recipe)
    part = _digits_speedrun(tmp_path, fast, epochs=3, name="part", stop_after=1, recipe=recipe)
    resumed = cnnkit.train(resume=part.run_dir)
    assert "init_from_data" not in resumed.fit.timings  # the checkpoint held the filters
    a = load_checkpoint(whole.run_dir / "checkpoints/last.pt")
    b = load_checkpoint(resumed.run_dir / "checkpoints/last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(
            value["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"]
        )
    if recipe == "airbench94":
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
