"""Bring your own model: import paths, module instances, the wrapper, the model file, --layers."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.cli.main import run
from cnnkit.errors import CnnkitError
from cnnkit.evaluation.gradcam import compute_cams, feature_module
from cnnkit.models import (
    WrappedClassifier,
    _registry,
    as_classifier,
    check_logits,
    create_model,
    layer_table,
    list_models,
    model_info,
)

NETS = "cnnkit_test_nets"  # the user's package, written below and imported by path
NETS_SOURCE = '''
import torch
from torch import nn

import cnnkit


class TinyNet(nn.Module):
    """No classifier contract: forward gives the logits."""

    def __init__(self, num_classes=10, in_chans=3, width=8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


class NeedsArgs(TinyNet):
    def __init__(self, width, num_classes=10, in_chans=3):
        super().__init__(num_classes, in_chans, width)


class FixedHead(TinyNet):
    """Takes no num_classes: its 10-way head is resized to the data's classes."""

    def __init__(self, in_chans=3):
        super().__init__(10, in_chans)


class NoPool(nn.Module):
    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, num_classes, 1)

    def forward(self, x):
        return self.conv(x)  # forgot to pool: (B, classes, H, W)


class LeNetBug(nn.Module):
    """The classic: Linear(16 * 5 * 5) fits 32x32 inputs, not 28x28 ones."""

    def __init__(self, num_classes=10, in_chans=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, num_classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def plain_factory(num_classes=10):
    return TinyNet(num_classes)


@cnnkit.register_model(input_size=(1, 8, 8), mean=(0.3,), std=(0.2,))
def tiny_registered(num_classes=10, in_chans=1, width=4):
    return TinyNet(num_classes, in_chans, width)
'''


@pytest.fixture(scope="session")
def nets_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user-package")
    (folder / f"{NETS}.py").write_text(NETS_SOURCE)
    return folder


@pytest.fixture
def nets(nets_dir, monkeypatch):
    """The user's module, importable for this test only; what it registers is forgotten after."""
    monkeypatch.syspath_prepend(str(nets_dir))
    monkeypatch.delitem(sys.modules, NETS, raising=False)
    monkeypatch.setattr(_registry, "_MODELS", dict(_registry._MODELS))
    yield importlib.import_module(NETS)
    sys.modules.pop(NETS, None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, nets_dir):
    """A run of TinyNet by import path on digits (1x8x8, 10 classes): ~5 s."""
    sys.path.insert(0, str(nets_dir))
    registry = dict(_registry._MODELS)
    try:
        result = cnnkit.train(
            "digits",
            model=f"{NETS}:TinyNet",
            overrides=["model.kwargs={width: 12}"],
            epochs=4,
            lr=0.5,
            out_dir=str(tmp_path_factory.mktemp("runs")),
            num_workers=0,
            progress="plain",
            report=False,
        )
    finally:
        sys.path.remove(str(nets_dir))
        sys.modules.pop(NETS, None)
        _registry._MODELS.clear()
        _registry._MODELS.update(registry)
    return result


def cli(capsys, *argv):
    code = run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_import_path_trains_and_load_model_rebuilds_it(trained, nets):
    assert trained.test["acc"] > 0.5, trained.test  # 10 classes: chance is 0.1
    model = cnnkit.load_model(trained.run_dir)
    assert model.meta["arch"] == f"{NETS}:TinyNet" and model.meta["kwargs"] == {"width": 12}
    assert isinstance(model, WrappedClassifier) and isinstance(model.model, nets.TinyNet)
    assert model.model.fc.in_features == 24  # built with the recorded kwargs
    image = Image.fromarray(np.zeros((8, 8), np.uint8))
    top = cnnkit.predict(trained.run_dir, [image], top_k=1, device="cpu")
    assert top[0]["top"][0]["class"] in model.meta["classes"]


def test_export_rebuilds_it_and_the_export_runs_without_it(
    trained, nets, nets_dir, monkeypatch, capsys
):
    code, out, err = cli(capsys, "export", trained.run_dir, "--format", "torchscript")
    assert code == 0 and "parity" in out, err
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(nets_dir)])
    sys.modules.pop(NETS)  # a TorchScript file needs no Python class
    exported = cnnkit.load_model(trained.run_dir / "model.torchscript.pt")
    assert exported(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_missing_import_refuses_in_one_line_at_the_cli(trained, capsys):
    assert NETS not in sys.modules
    code, out, err = cli(capsys, "predict", trained.run_dir, "any.png")
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1
    assert f"{NETS}:TinyNet" in err and "cannot be imported" in err and "PYTHONPATH" in err


def test_instance_trains_in_place_and_its_class_rebuilds_it(tmp_path, nets, capsys):
    net = nets.TinyNet(in_chans=1)
    before = net.body[0].weight.detach().clone()
    result = cnnkit.train(
        "digits", model=net, epochs=1, out_dir=str(tmp_path), num_workers=0, progress="plain",
        report=False,
    )  # fmt: skip
    assert "note:" not in capsys.readouterr().out  # TinyNet() rebuilds it: nothing to say
    assert not torch.equal(before, net.body[0].weight.detach().cpu())
    loaded = cnnkit.load_model(result.run_dir)
    assert loaded.meta["arch"] == f"{NETS}:TinyNet"
    assert isinstance(loaded.model, nets.TinyNet)


def test_instance_that_cannot_be_rebuilt_says_so_and_loads_into_a_module(tmp_path, nets, capsys):
    net = nets.NeedsArgs(width=6, in_chans=1)
    result = cnnkit.train(
        "digits",
        model=net,
        epochs=1,
        out_dir=str(tmp_path),
        num_workers=0,
        progress="plain",
        report=False,
    )
    out = capsys.readouterr().out
    assert f"'{NETS}:NeedsArgs'" in out and "load_model(path, model=" in out
    with pytest.raises(CnnkitError, match=r"width.*load_model\(path, model=\.\.\.\)"):
        cnnkit.load_model(result.run_dir)
    loaded = cnnkit.load_model(result.run_dir, model=nets.NeedsArgs(width=6, in_chans=1))
    trained_state = net.state_dict()  # one epoch: the best weights are the last ones
    assert all(torch.equal(v, trained_state[k].cpu()) for k, v in loaded.model.state_dict().items())


def test_only_module_classes_and_registered_builders_are_called(nets):
    with pytest.raises(CnnkitError, match="register_model"):
        create_model(f"{NETS}:plain_factory", num_classes=3)
    with pytest.raises(CnnkitError, match="'os:system' is a function"):
        create_model("os:system", command="echo from a model file")  # a file cannot run it
    with pytest.raises(CnnkitError, match="has no 'TinyNett'"):
        create_model(f"{NETS}:TinyNett")


def test_register_model_is_public_and_listed(nets):
    assert cnnkit.register_model is nets.cnnkit.models.register_model
    assert "tiny_registered" in list_models()
    for name in ("tiny_registered", f"{NETS}:tiny_registered"):
        model = create_model(name, num_classes=3, in_chans=1)
        cfg = model.default_cfg
        assert cfg["architecture"] == name and cfg["input_size"] == (1, 8, 8)
        assert cfg["mean"] == (0.3,) and model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_plugin_entry_point_registers_its_models(tmp_path, monkeypatch):
    from cnnkit.models import _registry

    (tmp_path / "plugin_nets.py").write_text(
        "import cnnkit\nfrom torch import nn\n\n"
        "@cnnkit.register_model\ndef plugin_net(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))\n"
    )
    info = tmp_path / "plugin_nets-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-nets\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[cnnkit.models]\nplugin_nets = plugin_nets\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_registry, "_MODELS", dict(_registry._MODELS))
    monkeypatch.setattr(_registry, "_PLUGINS_LOADED", False)
    monkeypatch.delitem(sys.modules, "plugin_nets", raising=False)
    assert "plugin_net" in list_models()


def test_wrapper_resizes_the_head_and_gradcam_finds_the_last_conv(nets):
    model = create_model(f"{NETS}:FixedHead", num_classes=3)
    assert isinstance(model, WrappedClassifier) and model.model.fc.out_features == 3
    assert model.default_cfg["feature_layer"] == "model.body.3"  # the last Conv2d
    assert model.default_cfg["classifier"] == "model.fc"
    assert feature_module(model) is model.model.body[3]
    images = torch.randn(2, 3, 16, 16)
    cams = compute_cams(model, images)
    assert cams.maps.shape == (2, 16, 16) and cams.probs.shape == (2, 3)
    assert model.forward_features(images).shape == (2, 16, 16, 16)
    model.reset_classifier(0)  # features only, and back
    model.reset_classifier(5)
    assert model(images).shape == (2, 5)


def test_wrapping_refuses_a_channel_mismatch_and_bad_logits(nets):
    with pytest.raises(CnnkitError, match=r"first conv \(conv1\) takes 1 channels .* have 3"):
        as_classifier(nets.LeNetBug(), "x:LeNetBug", 10, 3)
    with pytest.raises(CnnkitError, match=r"shape \(1, 4, 8, 8\).*not the logits \(1, 4\)"):
        check_logits(create_model(f"{NETS}:NoPool", num_classes=4), "x:NoPool", (3, 8, 8), 4)


def test_layer_table_shapes_params_flops_and_receptive_field():
    model = create_model("resnet18", num_classes=10)
    table = layer_table(model, (3, 224, 224))
    rows = {r.name: r for r in table.rows}
    assert table.error is None and table.output == (1, 10)
    assert rows["stem.0.conv"].output == (1, 64, 112, 112) and rows["stem.0.conv"].params == 9408
    assert rows["stages.3.1.conv2.conv"].receptive_field == (435, 435)  # ResNet-18's known RF
    assert rows["head.fc"].receptive_field is None  # after flattening: the whole image
    assert sum(r.params for r in table.rows) == table.params
    info = model_info(model, (3, 224, 224))
    assert table.flops == pytest.approx(info["gflops"] * 1e9)
    assert sum(r.flops for r in table.rows) == table.flops  # every FLOP is in a leaf here


def test_cli_layers_of_a_registry_model(capsys):
    code, out, err = cli(capsys, "models", "simple_cnn", "--layers", "--input-size", "8", "--json")
    assert code == 0, err
    table = json.loads(out)
    rows = {r["name"]: r for r in table["rows"]}
    assert table["input_size"] == [3, 8, 8] and table["error"] is None
    assert rows["features.0.conv"]["output"] == [1, 32, 8, 8]
    assert rows["features.3"]["output"] == [1, 64, 2, 2]  # two 2x2 pools: 8 -> 4 -> 2
    assert rows["features.4.conv"]["receptive_field"] == [18, 18]
    code, out, err = cli(capsys, "models", "simple_cnn", "--layers")
    assert code == 0 and "features.4.conv" in out and "Conv2d(64->128, k3 s1)" in out


def test_cli_layers_names_the_linear_that_gets_the_wrong_features(nets, capsys):
    argv = ["models", f"{NETS}:LeNetBug", "--layers", "--input-size", "28", "--in-chans", "1"]
    code, out, err = cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1, (out, err)
    assert "fc1: Linear(400->120)) got (1, 256)" in err and "mat1 and mat2" in err
    assert "conv2" in out  # the rows up to the failure show where 16x4x4 came from
    code, out, err = cli(capsys, *argv[:-4], "--input-size", "32", "--in-chans", "1")
    assert code == 0, err


def test_cli_layers_of_a_spec_names_the_entry_and_its_shape(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    layers = """
        - {conv: 16, bn: true, act: relu}
        - {pool: max, kernel: 2}
        - {conv: 32, kernel: 5, padding: 0}
        - {pool: max, kernel: 2}
        - {conv: 64, kernel: 5, padding: 0}
        - {flatten: true}
    """
    spec.write_text("model:\n  name: spec\n  kwargs:\n    layers:" + textwrap.indent(layers, "  "))
    code, out, err = cli(capsys, "models", spec, "--layers", "--input-size", "16")
    assert code == 2 and len(err.strip().splitlines()) == 1, (out, err)
    assert "layers[4] conv (features.4: Conv2d(32->64, k5 s1)) got (1, 32, 2, 2)" in err
    assert "layers[2] conv" in out  # the table names entries too
    code, out, err = cli(capsys, "models", spec, "--layers", "--input-size", "32")
    assert code == 0 and "final linear (added)" in out, err

    spec.write_text(textwrap.dedent(layers) + "- {conv: 8}\n")  # a bare list: a conv after flatten
    code, out, err = cli(capsys, "models", spec, "--layers")
    assert code == 2
    assert "layers[6]: conv needs a (B, C, H, W) map but gets flat features (B, 64)" in err


def test_cli_layers_of_a_config_with_model_auto_says_to_name_one(tmp_path, capsys):
    config = tmp_path / "auto.yaml"
    config.write_text("model: {name: auto}\ntrain: {epochs: 1}\n")
    code, out, err = cli(capsys, "models", config, "--layers")
    assert code == 2 and "model 'auto' picks its network from the data" in err
    assert len(err.strip().splitlines()) == 1
