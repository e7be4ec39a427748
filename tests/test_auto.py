"""model: auto (the default): the choice per input size, images and device; the one line it
prints and config.yaml's record; published weights found on disk in torchvision's layout; and
the offline path with no weights, which trains from scratch without touching the network."""

from __future__ import annotations

import socket

import pytest
import torch
import torchvision
import yaml

import cnnkit
from cnnkit.cli.main import run
from cnnkit.config import OptimConfig
from cnnkit.engine.checkpoint import load_checkpoint
from cnnkit.engine.optim import create_optimizer, create_scheduler
from cnnkit.models import auto, published
from conftest import write_image

OPTIONS = dict(progress="plain", num_workers=0, report=False)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty weight caches and no network, as in CI: any connection attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("CI", "true")

    def refuse(*args, **kwargs):
        raise AssertionError("model: auto tried the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def photo_folder(root, side: int = 48, per_class: int = 8):
    """Two classes of side x side 'photos' (larger than the 40 px CIFAR-like limit)."""
    for c, color in enumerate([(200, 60, 60), (60, 60, 200)]):
        for i in range(per_class):
            write_image(root / f"c{c}" / f"{i}.jpg", color, (side, side + 8), seed=c * 100 + i)
    return root


@pytest.mark.parametrize(
    ("side", "count", "device", "name", "input_size"),
    [
        (8, 1000, "cpu", "simple_cnn", None),
        (28, 60000, "cuda", "simple_cnn", None),
        (32, 50000, "cpu", "resnet20", None),
        (32, 50000, "cuda", "resnet18_cifar", None),
        (375, 245, "cpu", "resnet10_slim", 128),
        (375, 20000, "cpu", "resnet18_slim", 128),
        (375, 245, "cuda", "resnet18_slim", 128),
        (64, 245, "cpu", "resnet10_slim", 64),
    ],
)
def test_choice_per_size_images_and_device(side, count, device, name, input_size):
    choice = auto.choose(side, count, device)
    assert (choice.name, choice.input_size, choice.pretrained) == (name, input_size, False)
    assert "--model" in choice.line() and "\n" not in choice.line()


def test_weights_on_disk_or_asked_for_pick_the_pretrained_backbone(tmp_path):
    on_disk = published.Published("tv:resnet18", tmp_path / "resnet18.pth", 224)
    found = auto.choose(375, 245, "cpu", published=on_disk)
    assert (found.name, found.input_size, found.pretrained) == ("tv:resnet18", 224, True)
    asked = auto.choose(375, 245, "cpu", download=True)
    assert asked.pretrained and "--pretrained" in asked.reason
    assert auto.choose(8, 100, "cpu", published=on_disk).name == "simple_cnn"


def test_offline_without_weights_trains_from_scratch_and_records_it(tmp_path, offline, capsys):
    folder = photo_folder(tmp_path / "photos")
    args = ["train", str(folder), "--epochs", "1", "--batch-size", "8", "--quiet", "--no-report"]
    assert run([*args, "--num-workers", "0", f"train.out_dir={tmp_path}/runs"]) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("model auto:")]
    assert len(lines) == 1 and "resnet10_slim at 48 px, from scratch" in lines[0], lines
    assert "no pretrained weights on disk" in lines[0] and "not downloading: CI is set" in lines[0]
    assert "validation split that picked these weights" in out  # no test/: an optimistic score
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["name"] == "resnet10_slim" and saved["model"]["auto_choice"] == lines[0]
    assert saved["data"]["input_size"] == 48 and saved["model"]["pretrained"] is False
    # the photo settings apply only where the user left the default: tta yes, batch/epochs no
    assert (saved["data"]["batch_size"], saved["train"]["epochs"]) == (8, 1)
    assert saved["train"]["tta"] == "flip" and "where not set: batch_size 32" in lines[0]


def test_weights_in_the_torch_hub_cache_are_found_loaded_and_fine_tuned(tmp_path, offline, capsys):
    """Randomly initialised weights saved where torchvision keeps downloads: auto takes
    tv:resnet18 pretrained from that file, warms the head up with the body frozen, then
    unfreezes."""
    hub = published.hub_checkpoints()
    hub.mkdir(parents=True)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    saved = torchvision.models.resnet18().state_dict()
    torch.save(saved, hub / url.rsplit("/", 1)[1])
    folder = photo_folder(tmp_path / "photos", per_class=4)

    run = cnnkit.train(
        str(folder), epochs=2, stop_after=1, out_dir=str(tmp_path / "runs"), **OPTIONS
    )
    assert "tv:resnet18 at 224 px, pretrained" in capsys.readouterr().out
    cfg = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert cfg["model"]["pretrained"] and cfg["train"]["freeze_epochs"] == 1
    assert cfg["optim"]["body_lr_mult"] == auto.PRETRAINED_BODY_LR_MULT
    assert cfg["data"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # from the weights
    frozen = load_checkpoint(run.run_dir / "checkpoints/last.pt")["model"]
    assert torch.equal(frozen["model.layer1.0.conv1.weight"], saved["layer1.0.conv1.weight"])
    assert torch.equal(frozen["model.conv1.weight"], saved["conv1.weight"])

    done = cnnkit.train(resume=run.run_dir)
    after = load_checkpoint(done.run_dir / "checkpoints/last.pt")["model"]
    assert not torch.equal(after["model.layer1.0.conv1.weight"], saved["layer1.0.conv1.weight"])


def test_weights_file_in_torchvision_layout_names_the_architecture(tmp_path, offline, capsys):
    path = tmp_path / "mine.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), path)
    folder = photo_folder(tmp_path / "photos", per_class=4)
    cfg = cnnkit.config.resolve(str(folder), weights=str(path))
    choice = cnnkit.prepare.resolve_auto_model(cfg, "cpu")
    assert choice.name == cfg.model.name == "tv:resnet18" and not cfg.model.pretrained
    assert "--weights" in capsys.readouterr().out


def test_discriminative_lrs_keep_the_head_at_lr_and_the_body_below_all_run():
    model = cnnkit.create_model("test_resnet", num_classes=3)
    cfg = OptimConfig(lr=0.1, body_lr_mult=0.1)
    opt = create_optimizer(model, cfg, batch_size=32)
    sched = create_scheduler(opt, cfg, epochs=2, steps_per_epoch=5)
    for _ in range(4):
        opt.step()
        sched.step()
    head = {id(p) for p in model.get_classifier().parameters()}
    lrs = {all(id(p) in head for p in g["params"]): g["lr"] for g in opt.param_groups}
    assert lrs[False] == pytest.approx(0.1 * lrs[True]) and lrs[True] > 0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
