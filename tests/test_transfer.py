"""Transfer learning: --weights from a cnnkit model file or a torchvision state dict, head
replacement when the class count differs, --freeze-epochs, and --pretrained offline."""

from __future__ import annotations

import pytest
import torch
import torchvision

import cnnkit
from cnnkit.cli.main import run
from cnnkit.config import resolve as resolve_config
from cnnkit.data import build
from cnnkit.engine.checkpoint import load_checkpoint
from cnnkit.modelfile import load_model_file
from cnnkit.prepare import build_model as _build_model
from cnnkit.prepare import resolve_auto_model
from conftest import make_folder

FOLDER_OPTIONS = dict(progress="plain", num_workers=0, input_size=32)


def _two_class_folder(root):
    folder = make_folder(root, per_class=8)
    for path in sorted((folder / "blue").iterdir()):
        path.unlink()
    (folder / "blue").rmdir()
    return folder


def test_weights_from_model_file_replace_the_head_and_freeze_the_body(tmp_path, image_folder):
    source = cnnkit.train(
        str(image_folder), epochs=1, out_dir=str(tmp_path), name="src", **FOLDER_OPTIONS
    )
    src_state, _ = load_model_file(source.run_dir / "model.safetensors")
    target = _two_class_folder(tmp_path / "two")
    weights = str(source.run_dir / "model.safetensors")

    cfg = resolve_config(str(target), weights=weights, input_size=32)
    resolve_auto_model(cfg, "cpu")  # model: auto takes the architecture the file names
    assert cfg.model.name == "simple_cnn"
    model = _build_model(cfg, build(cfg.data, seed=0))
    state = model.state_dict()
    assert state["head.fc.weight"].shape[0] == 2
    body = [k for k in state if not k.startswith("head.")]
    assert all(torch.equal(state[k], src_state[k]) for k in body)

    part = cnnkit.train(
        str(target),
        epochs=3,
        out_dir=str(tmp_path),
        name="ft",
        weights=weights,
        freeze_epochs=1,
        stop_after=1,
        **FOLDER_OPTIONS,
    )
    after = load_checkpoint(part.run_dir / "checkpoints/last.pt")["model"]
    convs = [k for k in body if k.endswith("conv.weight")]
    assert convs and all(torch.equal(after[k], src_state[k]) for k in convs), "body frozen"
    assert not torch.equal(after["head.fc.weight"], state["head.fc.weight"]), "head trained"

    done = cnnkit.train(resume=part.run_dir)
    final = load_checkpoint(done.run_dir / "checkpoints/last.pt")["model"]
    assert not all(torch.equal(final[k], src_state[k]) for k in convs), "body trains after"


def test_weights_from_torchvision_state_dict(tmp_path, image_folder):
    reference = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    cfg = resolve_config(str(image_folder), model="tv:resnet18", weights=str(path), input_size=32)
    model = _build_model(cfg, build(cfg.data, seed=0))
    x = torch.randn(2, 3, 32, 32)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), _tv_features(reference, x), atol=1e-5)
    assert model(x).shape == (2, 3)

    result = cnnkit.train(
        str(image_folder),
        model="tv:resnet18",
        weights=str(path),
        epochs=1,
        out_dir=str(tmp_path),
        batch_size=16,
        **FOLDER_OPTIONS,
    )
    loaded = cnnkit.load_model(result.run_dir)
    assert loaded.meta["arch"] == "tv:resnet18" and loaded(x).shape == (2, 3)


def _tv_features(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def test_weights_file_that_does_not_fit(tmp_path, image_folder, capsys):
    path = tmp_path / "other.pth"
    torch.save(torchvision.models.mobilenet_v2(num_classes=10).state_dict(), path)
    code = run(
        [
            "train",
            str(image_folder),
            "--model",
            "resnet20",
            "--weights",
            str(path),
            "--epochs",
            "1",
            f"train.out_dir={tmp_path}/r",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_pretrained_offline_is_a_clear_error(tmp_path, image_folder, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights
    code = run(
        [
            "train",
            str(image_folder),
            "--model",
            "tv:resnet18",
            "--pretrained",
            "--epochs",
            "1",
            f"train.out_dir={tmp_path}/r",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "pretrained weights of tv:resnet18" in err and "--weights" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["resnet20"])
def test_pretrained_on_zoo_model_is_refused(tmp_path, capsys, name):
    code = run(["train", "--model", name, "--pretrained", f"train.out_dir={tmp_path}/r"])
    assert code == 2 and "no published weights" in capsys.readouterr().err


def test_pretrained_models_get_the_normalisation_of_their_weights(image_folder):
    from cnnkit.prepare import match_pretrained_normalisation as _match_pretrained_normalisation

    cfg = resolve_config(str(image_folder), model="tv:resnet18", input_size=32)
    splits = build(cfg.data, seed=0)
    model = _build_model(cfg, splits)  # random weights; pretend they were published ones
    assert _match_pretrained_normalisation(cfg, splits, model) is splits
    cfg.model.pretrained = True
    matched = _match_pretrained_normalisation(cfg, splits, model)
    assert matched.mean == pytest.approx(model.default_cfg["mean"])
    assert cfg.data.mean == pytest.approx(list(model.default_cfg["mean"]))
    assert splits.mean != matched.mean


def test_small_batch_fine_tuning_keeps_the_weights_batch_norm_statistics(tmp_path, image_folder):
    source = cnnkit.train(
        str(image_folder), epochs=1, out_dir=str(tmp_path), name="src", **FOLDER_OPTIONS
    )
    src_state, _ = load_model_file(source.run_dir / "model.safetensors")
    stats = [k for k in src_state if k.endswith(("running_mean", "running_var"))]
    assert stats
    weights = str(source.run_dir / "model.safetensors")
    runs = {}
    for mode in ("auto", "update"):
        runs[mode] = cnnkit.train(
            str(_two_class_folder(tmp_path / f"two-{mode}")), epochs=1, batch_size=8,
            out_dir=str(tmp_path), name=f"ft-{mode}", weights=weights,
            overrides=[f"train.bn_stats={mode}"], **FOLDER_OPTIONS,
        )  # fmt: skip
    frozen = load_checkpoint(runs["auto"].run_dir / "checkpoints/last.pt")
    assert frozen["config"]["train"]["bn_stats"] == "frozen"  # auto resolved, and recorded
    assert all(torch.equal(frozen["model"][k], src_state[k]) for k in stats)
    convs = [k for k in src_state if k.endswith("conv.weight")]
    assert not all(torch.equal(frozen["model"][k], src_state[k]) for k in convs)  # body trained
    updated = load_checkpoint(runs["update"].run_dir / "checkpoints/last.pt")["model"]
    assert not all(torch.equal(updated[k], src_state[k]) for k in stats)
