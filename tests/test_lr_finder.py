"""The learning-rate finder: leaves the model and optimizer alone, gives a robust suggestion, and
`--lr auto` trains digits well with it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml

import cnnkit
from cnnkit import data
from cnnkit.cli.main import run as cli
from cnnkit.config import Config, RuntimeConfig
from cnnkit.engine import runtime
from cnnkit.evaluation.lr_finder import BETA, lr_find, suggest

GOOD_DIGITS_LRS = (0.02, 3.0)  # peak lrs that reached >= 97% on digits in 8 epochs (sweep below)


def _digits_loader(batch_size: int = 64):
    splits = data.build(Config().data, seed=0)
    return data.make_loader(splits.train, batch_size, train=True, seed=0, num_workers=0)


OPTIMIZERS = {  # AdamW: its defaults hold a key its constructor refuses (the sweep's copy)
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_model_and_optimizer_are_untouched(name):
    torch.manual_seed(0)
    model = cnnkit.create_model("test_simple_cnn", num_classes=10, in_chans=1)
    optimizer = OPTIMIZERS[name](model.parameters())
    loader = _digits_loader()
    for images, labels in list(loader)[:2]:  # real momentum buffers and gradients
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    weights = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    model.train()

    rt = runtime.resolve(RuntimeConfig(device="cpu"))
    loader.sampler.set_epoch(3)
    result = lr_find(model, loader, optimizer, rt, steps=40)  # > 1 epoch of batches
    assert loader.sampler.epoch == 3

    assert len(result.lrs) > 10 and result.lrs[0] == pytest.approx(1e-6)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    after = optimizer.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), (index, key)
    assert optimizer.param_groups[0]["params"][0] is next(model.parameters())


def _smoothed(losses) -> list[float]:
    average, out = 0.0, []
    for step, loss in enumerate(losses):
        average = BETA * average + (1 - BETA) * loss
        out.append(average / (1 - BETA ** (step + 1)))
    return out


def test_suggestion_is_the_steepest_descent_despite_noise_and_divergence():
    lrs = np.logspace(-6, 1, 200)
    x = np.log10(lrs)
    # Falls fastest at lr 1e-3 (the sigmoid's middle), then blows up past lr 0.1, then NaN.
    clean = 2.3 - 2.0 / (1 + np.exp(-(x + 3) / 0.4)) + np.where(x > -1, 10 ** (3 * (x + 1)) - 1, 0)
    noisy = clean + np.random.default_rng(0).normal(0, 0.05, len(x))
    noisy[180:] = np.nan
    lr = suggest(lrs.tolist(), _smoothed(noisy))
    assert lr is not None and 10**-3.6 < lr < 10**-2.4, lr  # EMA lags the curve a little


def test_no_suggestion_when_the_loss_never_falls():
    lrs = np.logspace(-6, 1, 100).tolist()
    assert suggest(lrs, [float("nan")] * 100) is None
    assert suggest(lrs, list(np.linspace(1.0, 5.0, 100))) is None
    assert suggest(lrs[:5], [1.0, 0.9, 0.8, 0.7, 0.6]) is None


def test_train_with_auto_lr_learns_digits(tmp_path):
    result = cnnkit.train(lr="auto", epochs=8, out_dir=str(tmp_path), progress="plain")
    lr = yaml.safe_load((result.run_dir / "config.yaml").read_text())["optim"]["lr"]
    assert isinstance(lr, float) and GOOD_DIGITS_LRS[0] <= lr <= GOOD_DIGITS_LRS[1], lr
    assert result.test["acc"] >= 0.95, result.test


def test_lr_find_cli_suggests_a_good_lr_and_train_lr_auto_uses_it(tmp_path, capsys):
    out = tmp_path / "lr.png"
    assert cli(["lr-find", "digits", "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "swept 200 steps" in printed and out.stat().st_size > 5000
    suggested = float(printed.split("suggested lr: ")[1].split()[0])
    assert GOOD_DIGITS_LRS[0] <= suggested <= GOOD_DIGITS_LRS[1], suggested

    # `--lr auto` runs the same sweep (same model, data, batch and seed) and trains with it
    argv = ["train", "--lr", "auto", "--epochs", "1", "--no-report", "--num-workers", "0"]
    assert cli([*argv, "--name", "auto", f"train.out_dir={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert f"lr finder: suggested lr {suggested:g} " in printed, printed
    run_dir = tmp_path / "auto"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == suggested
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert {g["initial_lr"] for g in state["optimizer"]["param_groups"]} == {suggested}


def test_bad_lr_values(capsys):
    assert cli(["train", "--lr", "fast"]) == 2
    assert "must be a number or 'auto', got 'fast'" in capsys.readouterr().err
    with pytest.raises(cnnkit.CnnkitError, match="'optim.lr' expects float or 'auto', got 'fast'"):
        cnnkit.train(lr="fast", epochs=1)
